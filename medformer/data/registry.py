"""The MedMNIST registry: every subset's facts from ``medmnist.INFO`` (task, channels, sizes, MD5s),
and the errors the data layer raises (the CLI maps :class:`DataError` to exit code 2).

A site's own images join it as *imported* datasets (``medfl data import``): :func:`register` adds
their entries, read from the dataset cards of a data folder (``medformer.data.cards``) or from the
public description a site sends at discovery or an exported model carries; from then on a name
works wherever a MedMNIST flag does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import medmnist

SPLITS: tuple[str, ...] = ("train", "val", "test")

class DataError(Exception):
    """Base: bad or missing data. The CLI maps it to exit code 2; ``str(e)`` is one line."""


class UnknownDatasetError(DataError, KeyError):
    """A dataset flag that MedMNIST does not have; the message lists the valid flags."""

    def __str__(self) -> str:  # KeyError would repr() the message (adding quotes)
        return str(self.args[0]) if self.args else ""


class MissingFileError(DataError, FileNotFoundError):
    """The expected ``.npz`` file is not in the data directory."""

    def __str__(self) -> str:  # plain message, not OSError's "[Errno ...]" form
        return str(self.args[0]) if self.args else ""


class ChecksumError(DataError):
    """A file's MD5 differs from the official one: corrupt or modified."""


class FormatError(DataError):
    """A file that is not a MedMNIST npz: wrong keys, dtype, shapes, labels, pickles, not a zip."""


class UnsupportedSizeError(DataError, ValueError):
    """An image size for which the subset has no official file."""


# --------------------------------------------------------------------------- registry

# Short modality names for the 18 subsets of medmnist 3.0 (fallback: description's first sentence).
_MODALITY: dict[str, str] = {
    "pathmnist": "colon pathology (H&E histology)",
    "chestmnist": "chest X-ray",
    "dermamnist": "dermatoscope",
    "octmnist": "retinal OCT",
    "pneumoniamnist": "pediatric chest X-ray",
    "retinamnist": "fundus camera",
    "breastmnist": "breast ultrasound",
    "bloodmnist": "blood cell microscope",
    "tissuemnist": "kidney cortex microscope",
    "organamnist": "abdominal CT (axial)",
    "organcmnist": "abdominal CT (coronal)",
    "organsmnist": "abdominal CT (sagittal)",
    "organmnist3d": "abdominal CT (3D)",
    "nodulemnist3d": "chest CT (3D nodules)",
    "adrenalmnist3d": "shapes from abdominal CT (3D)",
    "fracturemnist3d": "chest CT (3D rib fractures)",
    "vesselmnist3d": "shapes from brain MRA (3D)",
    "synapsemnist3d": "electron microscope (3D)",
}

_TASKS = ("binary-class", "multi-class", "multi-label, binary-class", "ordinal-regression")


@dataclass(frozen=True)
class DatasetInfo:
    """What the project needs to know about one MedMNIST subset (from ``medmnist.INFO``)."""

    flag: str
    python_class: str
    modality: str
    task: str
    n_channels: int
    is_3d: bool
    labels: dict[str, str]
    n_samples: dict[str, int]
    sizes: tuple[int, ...]
    license: str
    origin: str = "medmnist"  # or "imported" (a dataset card)
    _md5s: dict[int, str] = field(default_factory=dict, repr=False, compare=False)
    _urls: dict[int, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def input_kind(self) -> str:
        """``"2d-1ch"``, ``"2d-3ch"`` or ``"3d-1ch"``."""
        return f"{'3d' if self.is_3d else '2d'}-{self.n_channels}ch"

    @property
    def n_classes(self) -> int:
        """Number of labels in ``INFO["label"]`` (classes, or binary labels for multi-label)."""
        return len(self.labels)

    @property
    def num_outputs(self) -> int:
        """Logits a downstream head needs (ordinal regression: n-1 cumulative logits)."""
        if self.task == "binary-class":
            return 2
        if self.task == "ordinal-regression":
            return self.n_classes - 1
        return self.n_classes

    @property
    def is_multi_label(self) -> bool:
        return self.task.startswith("multi-label")

    def __hash__(self) -> int:  # dict fields are unhashable; the flag identifies a subset
        return hash((self.flag, self.python_class))

    @property
    def imported(self) -> bool:
        return self.origin != "medmnist"

    def md5(self, size: int) -> str:
        """Official MD5 of the file for ``size``; :class:`UnsupportedSizeError` otherwise.

        An imported dataset known here only from its public description (no card in this data
        folder) has none: :class:`MissingFileError`.
        """
        _check_size(self, size)
        if size not in self._md5s:
            raise MissingFileError(
                f"{self.flag} (size {size}) is a dataset imported at a site; this machine knows only its "
                "public description: its npz and dataset card are not in this data folder"
            )
        return self._md5s[size]

    def url(self, size: int) -> str:
        """Official download URL of the file for ``size``."""
        _check_size(self, size)
        return self._urls.get(size, "")


def _modality(flag: str, description: str) -> str:
    if flag in _MODALITY:
        return _MODALITY[flag]
    first = description.split(". ")[0].strip().rstrip(".")
    return first[:80]


def _build_registry(info: dict[str, dict[str, Any]]) -> dict[str, DatasetInfo]:
    registry: dict[str, DatasetInfo] = {}
    for flag, raw in info.items():
        md5s: dict[int, str] = {}
        urls: dict[int, str] = {}
        for key, value in raw.items():
            if key == "MD5":
                size = 28
            elif key.startswith("MD5_") and key[4:].isdigit():
                size = int(key[4:])
            else:
                continue
            md5s[size] = str(value)
            urls[size] = str(raw.get("url" if size == 28 else f"url_{size}", ""))
        registry[flag] = DatasetInfo(
            flag=flag,
            python_class=str(raw["python_class"]),
            modality=_modality(flag, str(raw.get("description", ""))),
            task=str(raw["task"]),
            n_channels=int(raw["n_channels"]),
            is_3d=flag.endswith("3d"),
            labels={str(k): str(v) for k, v in raw["label"].items()},
            n_samples={str(k): int(v) for k, v in raw["n_samples"].items()},
            sizes=tuple(sorted(md5s)),
            license=str(raw.get("license", "")),
            _md5s=md5s,
            _urls=urls,
        )
    return registry


REGISTRY: dict[str, DatasetInfo] = _build_registry(medmnist.INFO)


def get_info(flag: str) -> DatasetInfo:
    """Registry entry for ``flag``; :class:`UnknownDatasetError` listing the valid flags."""
    try:
        return REGISTRY[flag]
    except (KeyError, TypeError):
        imported = [f for f, i in REGISTRY.items() if i.imported]
        also = f"; imported here: {', '.join(imported)}" if imported else ""
        raise UnknownDatasetError(
            f"unknown MedMNIST dataset {flag!r}; valid flags: {', '.join(f for f in REGISTRY if f not in imported)}"
            f"{also} (a site's own images: `medfl data import`, then --data-dir the folder that holds its card)"
        ) from None


#: What must agree between two descriptions of one imported dataset (checksums and counts may differ).
PUBLIC_FACTS: tuple[str, ...] = ("task", "n_channels", "is_3d", "labels")


def register(info: DatasetInfo) -> DatasetInfo:
    """Add an imported dataset to the registry (idempotent), and return the entry now in force.

    The same dataset described again (same task, channels, dimensionality and labels) merges: its
    sizes and checksums join the entry. A MedMNIST flag, or a different dataset under a known name,
    is a :class:`DataError` naming both.
    """
    if not info.imported:
        raise DataError(f"register() is for imported datasets, not {info.flag!r} from {info.origin}")
    old = REGISTRY.get(info.flag)
    if old is None:
        REGISTRY[info.flag] = info
        return info
    if not old.imported:
        raise DataError(f"imported dataset name {info.flag!r} is a MedMNIST flag; import it under another --name")
    differ = [f for f in PUBLIC_FACTS if getattr(old, f) != getattr(info, f)]
    if differ:
        raise DataError(
            f"imported dataset {info.flag!r} is described differently in two places ({', '.join(differ)}: "
            f"{getattr(old, differ[0])!r} vs {getattr(info, differ[0])!r}); give one of them another name"
        )
    merged = DatasetInfo(
        flag=old.flag, python_class=old.python_class, modality=old.modality or info.modality, task=old.task,
        n_channels=old.n_channels, is_3d=old.is_3d, labels=old.labels, n_samples=info.n_samples or old.n_samples,
        sizes=tuple(sorted(set(old.sizes) | set(info.sizes))), license=old.license or info.license,
        origin=old.origin, _md5s={**old._md5s, **info._md5s}, _urls={**old._urls, **info._urls},
    )
    REGISTRY[info.flag] = merged
    return merged


def _check_size(info: DatasetInfo, size: int) -> None:
    if size not in info.sizes:
        sizes = ", ".join(str(s) for s in info.sizes)
        raise UnsupportedSizeError(
            f"{info.flag} has no official size {size!r}; available sizes: {sizes}"
        )
