"""``medfl data import SRC --name NAME --task TASK [--labels labels.csv] --size 28|64 --out DIR``: a site's
own images (PNG/JPEG folders, NIfTI volumes, DICOM series) as an official-format npz plus a dataset
card, usable wherever a MedMNIST flag is once ``--data-dir DIR`` names the folder.

MONAI is imported here only when the command runs (``medformer.data.importing``): it is slow to
import and nothing else needs it.
"""
from __future__ import annotations

import sys
from pathlib import Path

from medformer.data import DataError


def parse_fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise DataError(f"--split-fractions {text!r}: expected three numbers such as 0.7,0.1,0.2") from None
    if len(parts) != 3:
        raise DataError(f"--split-fractions {text!r}: expected three numbers (train,val,test)")
    return parts  # type: ignore[return-value]


def run_import(src: str, *, name: str, task: str, labels: str | None, size: int, out: str, classes: str | None,
               seed: int, fractions: str, modality: str, license: str, progress: bool) -> int:
    from medformer.data.importing import ImportSpec, import_dataset
    from medformer.pretext import TASKS

    if name in TASKS:  # outputs.<dataset> and outputs.<pretext task> share one namespace
        raise DataError(f"--name {name!r} is the name of a pretext task; choose another name")
    spec = ImportSpec(src=Path(src), name=name, task=task, labels=Path(labels) if labels else None, size=size,
                      out=Path(out), classes=tuple(c.strip() for c in classes.split(",")) if classes else None,
                      seed=seed, fractions=parse_fractions(fractions), modality=modality, license=license)
    card = import_dataset(spec, progress=progress)
    splits = ", ".join(f"{s} {n}" for s, n in card["n_samples"].items())
    print(f"imported {card['name']}: {card['task']}, {len(card['labels'])} labels, "
          f"{'3D' if card['is_3d'] else '2D'} {card['n_channels']}-channel at {size} pixels ({splits}) -> {out}")
    print(f"medfl data import: use it with --dataset {card['name']} --data-dir {out}", file=sys.stderr)
    return 0
