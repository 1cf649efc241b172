"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
REAL_FILES = (
    "breastmnist.npz",
    "pneumoniamnist.npz",
    "retinamnist.npz",
    "adrenalmnist3d.npz",
    "adrenalmnist3d_64.npz",
    "vesselmnist3d.npz",
)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Folder with the real MedMNIST files: $MEDMNIST_DATA, else ../shared/data/medmnist.

    Fails (never skips) when the files are missing: CI always has them.
    """
    env = os.environ.get("MEDMNIST_DATA", "").strip()
    default = (REPO_ROOT / ".." / "shared" / "data" / "medmnist").resolve()
    folder = Path(env).expanduser() if env else default
    missing = [name for name in REAL_FILES if not (folder / name).is_file()]
    if missing:
        pytest.fail(
            f"real MedMNIST files missing in {folder}: {', '.join(missing)}; "
            f"set $MEDMNIST_DATA to the folder that holds them",
            pytrace=False,
        )
    return folder


@pytest.fixture
def flower_task_identity():
    """Flower messages need the identity of a running task: pose as one, then restore it."""
    from deploy.payload import task_identity

    with task_identity():
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: on a busy 2-core machine two threads wait on each other at every op
    (seen here: tiny-model steps up to 100x slower); these models and batches are too small to gain."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The quickstart as the CLI tests run it: tiny model, a few local steps, a capped probe.
QUICKSTART_FAST_SETS = ("training.rounds=2", "model.preset=tiny", "training.local_steps=3",
                        "evaluation.max_train_examples=300")


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory, real_data_dir) -> Path:
    """One finished `medfl run` of the quickstart (QUICKSTART_FAST_SETS), shared by the tests that only
    read its output folder: each end-to-end run costs half a minute on 2 cores. Treat it as read-only."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("quickstart") / "run"
    sets = [x for s in QUICKSTART_FAST_SETS for x in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "run",
                           str(REPO_ROOT / "simulations" / "configs" / "quickstart.yaml"), "--data-dir",
                           str(real_data_dir), "--out", str(out), "--no-progress", *sets], cwd=REPO_ROOT,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
