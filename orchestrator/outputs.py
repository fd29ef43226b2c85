"""Output folders the user names (``--out``): checked before any work starts."""

from __future__ import annotations

import os
from pathlib import Path

from encmm.trainables.config import ConfigError


def check_out_folder(folder: Path) -> None:
    """``--out`` must be a folder, or a path where one can be made (its nearest existing parent a writable folder)."""
    folder = folder.resolve()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"--out: {existing} exists and is not a folder")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"--out: {existing} is not writable")
