"""Round checkpoints: written atomically with a SHA-256 checksum, verified on load.

Layout: ``checkpoints/round-0003.pt`` plus ``round-0003.pt.sha256``. Each file is written to a
temporary name, fsynced and renamed, the checksum last: a checkpoint without a matching checksum
is incomplete or damaged and is never loaded silently.

The payload holds only tensors (numpy arrays are stored as tensors), numbers, strings and
containers, and is read back with ``torch.load(weights_only=True)``: loading a checkpoint never
runs code from it, whoever wrote the file.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NAME = re.compile(r"round-(\d{4,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or does not match its checksum."""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: str | os.PathLike, round_: int, payload: dict[str, Any]) -> Path:
    """Write round ``round_``'s payload (weights, strategy state, ...) and its checksum."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(_tensors({"round": round_, **payload}), buf)
    data = buf.getvalue()
    path = directory / f"round-{round_:04d}.pt"
    _atomic_write(path, data)
    _atomic_write(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode())
    return path


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(round, path) of every checkpoint file present, oldest first (checksums not yet checked)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load one checkpoint after checking its SHA-256; CheckpointError names what is wrong."""
    path = Path(path)
    sha_path = path.with_name(path.name + ".sha256")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if not sha_path.exists():
        raise CheckpointError(f"checkpoint {path} has no checksum file (interrupted while writing?)")
    expected = sha_path.read_text().strip()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: sha256 {actual[:12]}... "
                              f"!= recorded {expected[:12]}...")
    return _arrays(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))


def _tensors(obj: Any) -> Any:
    """numpy arrays -> tensors, recursively (what ``weights_only`` loading accepts)."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors(v) for v in obj)
    return obj


def _arrays(obj: Any) -> Any:
    """tensors -> numpy arrays, recursively (the checkpoint's callers work in numpy)."""
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _arrays(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_arrays(v) for v in obj)
    return obj


def load_latest(directory: str | os.PathLike, *, fallback: bool = False) -> dict[str, Any] | None:
    """The newest checkpoint, or None if there is none.

    A damaged newest checkpoint raises CheckpointError unless ``fallback`` is True, in which case
    older ones are tried in turn (the user asked for it: rounds after the good one are redone).
    """
    errors = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return load_checkpoint(path)
        except CheckpointError as e:
            if not fallback:
                raise CheckpointError(f"{e}; rerun with --resume --fallback-checkpoint to resume from the "
                                      "previous good checkpoint") from None
            errors.append(str(e))
    if errors:
        raise CheckpointError("no intact checkpoint: " + "; ".join(errors))
    return None
