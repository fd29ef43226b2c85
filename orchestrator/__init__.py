"""encmm orchestrator: the CLI, Ray cluster/Tune glue and the one module that speaks MLflow."""

import os


def env_flag(name: str) -> bool:
    """Whether the switch ``name`` is on in the environment (set, and not "0"): ``ENCMM_DEBUG``,
    ``ENCMM_VERBOSE`` and ``ENCMM_DASHBOARD``, which the global options ``--debug``, ``--verbose`` and
    ``--dashboard`` set for every module and process of the command."""
    return os.environ.get(name, "") not in ("", "0")
