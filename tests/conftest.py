"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
