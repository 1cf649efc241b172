"""Dataset cards: what makes a site's own images (``medfl data import``) a dataset like any MedMNIST flag.

A card is ``<name>.dataset.json`` next to the official-format ``<name>.npz`` (``<name>_64.npz`` at 64
pixels) in a data folder. It says what the npz holds (task, label names, channels, 2D/3D, sizes,
split sizes) and its checksums; :func:`register_data_dir` reads every card of a folder into the
registry, after which the name works everywhere a MedMNIST flag does: scenarios, node-config,
``medfl finetune`` and ``medfl predict``, and the files are MD5-checked like the official ones.

Only the *public* part (:func:`public_card`: name, task, labels, channels, 2D/3D, sizes, modality,
license; no checksums, counts or paths) leaves a site: in its discovery reply, so that a server
without the files can build the model, and in an exported model's ``config.json``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from medformer.data.registry import REGISTRY, SPLITS, DataError, DatasetInfo, FormatError, register
from medformer.data.files import resolve_data_dir

CARD_SUFFIX = ".dataset.json"
CARD_FORMAT = "medformer-fl dataset card"
CARD_VERSION = 1
TASKS = ("binary-class", "multi-class", "multi-label, binary-class", "ordinal-regression")
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")
SIZES_2D, SIZES_3D = (28, 64, 128, 224), (28, 64)
PUBLIC_KEYS = ("name", "task", "labels", "n_channels", "is_3d", "sizes", "modality", "license")


def card_path(directory: str | os.PathLike, name: str) -> Path:
    return Path(directory) / f"{name}{CARD_SUFFIX}"


def check_name(name: Any) -> str:
    """A valid imported dataset name (lower-case letters, digits, '_'; not a MedMNIST flag)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise DataError(f"dataset name {name!r} is not valid: use 1-40 lower-case letters, digits or '_', "
                        "starting with a letter")
    known = REGISTRY.get(name)
    if known is not None and not known.imported:
        raise DataError(f"dataset name {name!r} is a MedMNIST flag; choose another name")
    return name


def _problem(where: str, key: str, message: str) -> FormatError:
    return FormatError(f"{where}: {key} {message}")


def validate_public(card: Any, where: str) -> dict[str, Any]:
    """The public fields of a card, checked; :class:`FormatError` naming ``where`` and the bad key."""
    if not isinstance(card, dict):
        raise FormatError(f"{where}: a dataset card is a JSON object, got {type(card).__name__}")
    missing = [k for k in ("name", "task", "labels", "n_channels", "is_3d", "sizes") if k not in card]
    if missing:
        raise FormatError(f"{where}: lacks key(s) {', '.join(missing)}")
    check_name(card["name"])
    if card["task"] not in TASKS:
        raise _problem(where, "task", f"{card['task']!r} is not one of {', '.join(TASKS)}")
    labels = card["labels"]
    if (not isinstance(labels, dict) or len(labels) < 2 or sorted(labels) != sorted(map(str, range(len(labels))))
            or not all(isinstance(v, str) for v in labels.values())):
        raise _problem(where, "labels", "must map '0'..'n-1' (n >= 2) to label names")
    if card["task"] == "binary-class" and len(labels) != 2:
        raise _problem(where, "labels", f"a binary-class task has 2 labels, not {len(labels)}")
    is_3d = card["is_3d"]
    if not isinstance(is_3d, bool):
        raise _problem(where, "is_3d", "must be true or false")
    if card["n_channels"] not in ((1,) if is_3d else (1, 3)):
        raise _problem(where, "n_channels", f"{card['n_channels']!r} is not supported ({'1' if is_3d else '1 or 3'})")
    allowed = SIZES_3D if is_3d else SIZES_2D
    sizes = card["sizes"]
    if not isinstance(sizes, list) or not sizes or any(s not in allowed for s in sizes):
        raise _problem(where, "sizes", f"{sizes!r} must be a list of sizes from {allowed}")
    for key in ("modality", "license"):
        if not isinstance(card.get(key, ""), str):
            raise _problem(where, key, "must be a string")
    return {k: card.get(k, "") for k in PUBLIC_KEYS}


def info_from_card(card: dict[str, Any], where: str, *, origin: str = "imported") -> DatasetInfo:
    """A registry entry from a card; with ``files`` (a full card) it carries their MD5s, so the npz
    is checked like an official file."""
    public = validate_public(card, where)
    md5s: dict[int, str] = {}
    files = card.get("files")
    if files is not None:
        if not isinstance(files, dict):
            raise _problem(where, "files", "must map sizes to {file, md5, sha256}")
        for size in public["sizes"]:
            entry = files.get(str(size))
            if not isinstance(entry, dict) or not re.fullmatch(r"[0-9a-f]{32}", str(entry.get("md5", ""))):
                raise _problem(where, "files", f"has no md5 for size {size}")
            md5s[int(size)] = entry["md5"]
    n_samples = card.get("n_samples") or {}
    if not isinstance(n_samples, dict) or any(k not in SPLITS or not isinstance(v, int) for k, v in n_samples.items()):
        raise _problem(where, "n_samples", "must map train/val/test to counts")
    return DatasetInfo(
        flag=public["name"], python_class="", modality=public["modality"] or "imported images",
        task=public["task"], n_channels=int(public["n_channels"]), is_3d=bool(public["is_3d"]),
        labels={str(k): str(v) for k, v in public["labels"].items()}, n_samples=dict(n_samples),
        sizes=tuple(sorted(int(s) for s in public["sizes"])), license=public["license"], origin=origin,
        _md5s=md5s,
    )


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """A card file, parsed and checked (:class:`FormatError` names the file and the bad key)."""
    path = Path(path)
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"cannot read dataset card {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not a JSON dataset card ({e})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        found = card.get("format") if isinstance(card, dict) else None
        raise FormatError(f"{path}: not a {CARD_FORMAT!r} (its 'format' key is {found!r})")
    info_from_card(card, str(path))
    expected = path.name[: -len(CARD_SUFFIX)]
    if card["name"] != expected:
        raise FormatError(f"{path}: name {card['name']!r} differs from the file name ({expected}{CARD_SUFFIX})")
    return card


def register_data_dir(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Register every dataset card of a data folder (``--data-dir``, else ``$MEDMNIST_DATA``, else
    ``~/.medmnist``); returns their names. A folder without cards (or none at all) registers nothing."""
    directory = resolve_data_dir(data_dir)
    try:
        paths = sorted(directory.glob(f"*{CARD_SUFFIX}")) if directory.is_dir() else []
    except OSError:
        return []
    names = []
    for path in paths:
        card = read_card(path)
        register(info_from_card(card, str(path)))
        names.append(card["name"])
    return names


def public_card(info: DatasetInfo) -> dict[str, Any]:
    """What may leave a site about an imported dataset: no checksums, split sizes or paths."""
    return {"name": info.flag, "task": info.task, "labels": dict(info.labels), "n_channels": info.n_channels,
            "is_3d": info.is_3d, "sizes": list(info.sizes), "modality": info.modality, "license": info.license}


def register_public(card: Any, where: str) -> DatasetInfo:
    """Register an imported dataset from its public description (a site's discovery reply, an exported
    model's config); a dataset already known here must agree with it."""
    return register(info_from_card({k: v for k, v in dict(card).items() if k != "files"} if isinstance(card, dict)
                                   else card, where))
