"""Where the Medformer computes: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

One spelling everywhere (a scenario's ``device``, a site's node-config ``device``, ``--device`` on the
commands). Each party resolves it against its own hardware: ``auto`` is the first CUDA device when
there is one, else the CPU; an explicit ``cuda`` on a machine without CUDA is an error there, not a
silent fallback. The model is moved once; batches follow the model (``MedMNISTSplit.batch(device=)``).
"""
from __future__ import annotations

import re
from typing import Any

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")


class DeviceError(ValueError):
    """A device that is malformed or not present on this machine (the CLI maps it to exit code 2)."""


def is_device_spec(spec: Any) -> bool:
    """True for ``auto``, ``cpu``, ``cuda`` and ``cuda:N``."""
    return isinstance(spec, str) and _SPEC.fullmatch(spec) is not None


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device ``spec`` names on this machine.

    Raises:
        DeviceError: a malformed spec, or CUDA asked for where it is not available (or has fewer devices).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = "auto" if spec is None or spec == "" else spec
    if not is_device_spec(spec):
        raise DeviceError(f"device {spec!r} is not one of {DEVICE_CHOICES}")
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r} asked for, but CUDA is not available on this machine "
                          f"(torch {torch.__version__}); use device auto or cpu")
    index = int(spec.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {spec!r} asked for, but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_cpu(obj: Any) -> Any:
    """Tensors (in dicts, lists and tuples, recursively) moved to the CPU: what is saved or sent."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
