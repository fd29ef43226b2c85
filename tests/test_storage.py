"""Checkpoints in a bucket (`tracking.storage: s3://...`) on a real S3-compatible server (moto's, loopback).

These tests drive the functions a Train worker calls. With Ray: tests/test_ray_train.py (a 2-worker DDP run,
rank 0 SIGKILLed mid-epoch, resumes from the bucket) and the killed trial of tests/test_sweep.py (local mode).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.fs
import pytest
import torch

from encmm.trainables import storage
from encmm.trainables.config import ConfigError, TrainConfig, load_train_config, with_absolute_paths
from encmm.trainables.engine import load_resume_checkpoint, save_checkpoint
from tests.conftest import TINY_DIGITS


def objects(uri: str) -> list[str]:
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path.removeprefix(path + "/") for i in infos if i.type == pyarrow.fs.FileType.File)


def fake_checkpoint(epoch: int) -> dict:
    return {"epoch": epoch, "model": {"w": torch.full((4,), float(epoch))}, "optimizer": {}}


def test_a_checkpoint_in_a_bucket_replaces_the_last_and_keeps_it_as_the_fallback(s3_bucket):
    uri = f"{s3_bucket}/run/checkpoint.pt"
    save_checkpoint(fake_checkpoint(0), uri, keep_previous=True)
    save_checkpoint(fake_checkpoint(1), uri, keep_previous=True)
    assert objects(f"{s3_bucket}/run") == ["checkpoint.pt", "checkpoint.pt.prev"]
    ckpt, found = load_resume_checkpoint([uri])
    assert found == uri and ckpt["epoch"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(4))


def test_a_truncated_checkpoint_in_a_bucket_falls_back_to_the_previous_one(s3_bucket, caplog):
    uri = f"{s3_bucket}/run/checkpoint.pt"
    save_checkpoint(fake_checkpoint(0), uri, keep_previous=True)
    save_checkpoint(fake_checkpoint(1), uri, keep_previous=True)
    whole = storage.read_bytes(uri)
    storage.upload(whole[: len(whole) // 2], uri)  # an upload cut short by someone else's tool
    ckpt, found = load_resume_checkpoint([uri])
    assert found == uri + ".prev" and ckpt["epoch"] == 0
    assert f"checkpoint {uri} is unreadable" in caplog.text


def test_nothing_in_the_bucket_means_starting_over(s3_bucket):
    assert load_resume_checkpoint([f"{s3_bucket}/never-written/checkpoint.pt"]) is None


def test_worker_resume_falls_back_to_rays_older_checkpoint_in_the_bucket(s3_bucket, tmp_path):
    """Ray Train keeps 2 committed checkpoints under the run's prefix; ``get_checkpoint()`` downloads the
    latest. When that copy is corrupt, the resume reads the older one straight from the bucket."""
    from encmm.trainables.ray_worker import CHECKPOINT_FILE, committed_checkpoints

    run = f"{s3_bucket}/runs/r1"
    names = [f"checkpoint_2026-12-03_10-00-0{i}.000000" for i in range(3)]
    for epoch, name in enumerate(names):
        save_checkpoint(fake_checkpoint(epoch), f"{run}/{name}/{CHECKPOINT_FILE}")
    downloaded = tmp_path / "download" / CHECKPOINT_FILE  # what as_directory() gives: a local copy
    downloaded.parent.mkdir()
    downloaded.write_bytes(b"corrupt")
    candidates = committed_checkpoints(run, downloaded, names[-1])
    assert candidates == [downloaded, f"{run}/{names[1]}/{CHECKPOINT_FILE}", f"{run}/{names[0]}/{CHECKPOINT_FILE}"]
    ckpt, found = load_resume_checkpoint(candidates)
    assert ckpt["epoch"] == 1 and found == candidates[1]


def test_a_checkpoint_write_that_cannot_reach_the_bucket_is_a_clear_error(s3_server):
    from encmm.trainables.engine import CheckpointWriteError

    uri = "s3://encmm-no-such-bucket/run/checkpoint.pt"
    with pytest.raises(CheckpointWriteError, match=f"cannot write checkpoint {uri}: .*no earlier checkpoint"):
        save_checkpoint(fake_checkpoint(0), uri, keep_previous=True)


@pytest.mark.parametrize(
    ("storage_uri", "message"),
    [
        ("ftp://host/x", "unknown storage scheme 'ftp'"),
        ("s3://", "name a bucket"),
    ],
)
def test_storage_that_is_no_bucket_pyarrow_knows_is_refused_by_the_schema(storage_uri, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, [f"tracking.storage={storage_uri}"])


def test_a_bucket_as_output_dir_is_refused_and_points_to_storage():
    with pytest.raises(ConfigError, match="set tracking.storage: s3://b/x"):
        load_train_config(None, ["tracking.output_dir=s3://b/x"])


def test_a_missing_bucket_stops_encmm_train_before_any_run_with_one_line(s3_server, tmp_path):
    exe = Path(sys.executable).with_name("encmm")
    command = [str(exe) if exe.exists() else "encmm", "train", *_sets("tracking.storage=s3://encmm-missing/x")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("encmm: error:") and "tracking.storage" in done.stderr
    assert "bucket 'encmm-missing' does not exist" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no store, no run folder


def _sets(*overrides: str) -> list[str]:
    return [arg for item in (*TINY_DIGITS, *overrides) for arg in ("--set", item)]


def test_a_local_storage_folder_is_made_absolute_like_output_dir(tmp_path):
    cfg = with_absolute_paths(TrainConfig.model_validate({"tracking": {"storage": "ckpts"}}), tmp_path)
    assert cfg.tracking.storage == str(tmp_path.resolve() / "ckpts")
    assert cfg.tracking.checkpoint_root() == cfg.tracking.storage
