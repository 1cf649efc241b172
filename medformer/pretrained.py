"""Exported Medformers: a folder any machine can load with pure PyTorch, no pickle and no repository
internals (``medfl export``, ``medfl finetune``).

    model.safetensors  every tensor of the model's state dict (safetensors holds tensors only)
    config.json        the architecture (the preset and every MedformerConfig field), the datasets it
                       has tokenizers and latents for (with their public facts: kind, task, labels,
                       sizes), its pretext tasks, downstream heads and linear probes, the sharing scope
                       of every tensor, the library versions and where the weights came from
    README.md          the model card (what it was trained on, by whom, how well it does, its limits)

:func:`load_pretrained` rebuilds the model from ``config.json`` with ``build_medformer`` (the pretext
heads from ``medformer.pretext``), loads the weights strictly and returns it ready to embed or
fine-tune. Nothing here names a layer: whatever the architecture builds is saved and loaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from medformer.data import DataError, get_info, public_card, register_public
from medformer.device import device_of, resolve_device
from medformer.eval.probe_head import LinearProbe
from medformer.model import DatasetRef, Medformer, MedformerConfig, build_medformer, normalise_datasets, scope_of
from medformer.pretext import PretextObjective

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
FORMAT, FORMAT_VERSION = "medformer-fl model", 1


class ModelDirError(DataError):
    """A model folder that is missing, incomplete, damaged or of another format (exit code 2)."""


def library_versions() -> dict[str, str]:
    try:
        own = version("medformer-fl")
    except PackageNotFoundError:  # pragma: no cover - a source tree without an install
        own = "source"
    return {"medformer-fl": own, "torch": torch.__version__}


def describe_dataset(flag: str, size: int) -> dict[str, Any]:
    """A dataset's public facts, as config.json records them (imported ones with their public card)."""
    info = get_info(flag)
    out = {"flag": flag, "size": int(size), "input_kind": info.input_kind, "task": info.task,
           "labels": dict(info.labels), "n_channels": info.n_channels, "is_3d": info.is_3d,
           "num_outputs": info.num_outputs, "modality": info.modality, "origin": info.origin}
    if info.imported:
        out["card"] = public_card(info)
    return out


def probes_of(model: Medformer) -> Mapping[str, LinearProbe]:
    """The linear probes carried by ``model`` (``model.probes``), by dataset."""
    return getattr(model, "probes", None) or {}


def attach_probe(model: Medformer, dataset: str, probe: LinearProbe) -> None:
    """Carry a fitted linear probe for ``dataset`` (saved and loaded with the model as ``probes.<dataset>``)."""
    if not isinstance(getattr(model, "probes", None), nn.ModuleDict):
        model.probes = nn.ModuleDict()
    model.probes[dataset] = probe.to(device_of(model))


def model_config(model: Medformer, *, preset: str, pretext: Mapping[str, Any] | None = None,
                 source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What config.json says about ``model`` (weights' checksum added by :func:`save_pretrained`).

    Args:
        preset: the model preset it was built from (``model.cfg`` holds every field anyway).
        pretext: ``{"weights": {task: weight}, "mask_ratio": r}`` when it carries pretext heads.
        source: where the weights came from (a run, a fine-tune): free-form, kept as given.
    """
    flags = [f for f, _ in model.datasets]
    heads = {f: {"kind": "task", "task": get_info(f).task, "num_outputs": get_info(f).num_outputs}
             for f in flags if f in model.outputs}
    probes = {f: {"kind": "linear_probe", "task": get_info(f).task, "activation": p.activation,
                  "num_outputs": int(p.weight.shape[0]), "dim": int(p.weight.shape[1])}
              for f, p in probes_of(model).items()}
    scopes: dict[str, dict[str, int]] = {}
    for key, value in model.state_dict().items():
        s = scopes.setdefault(scope_of(key), {"tensors": 0, "values": 0})
        s["tensors"] += 1
        s["values"] += int(value.numel())
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library": library_versions(),
        "preset": preset, "model": dataclasses.asdict(model.cfg),
        "datasets": [describe_dataset(f, s) for f, s in model.datasets],
        "pretext": dict(pretext) if pretext else None,
        "heads": {**heads, **probes},
        "scopes": scopes,
        "source": dict(source or {}),
    }


def save_pretrained(model: Medformer, directory: str | os.PathLike, *, preset: str,
                    pretext: Mapping[str, Any] | None = None, card: str | Callable[[dict], str] = "",
                    source: Mapping[str, Any] | None = None, extra_files: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` to ``directory`` (which must not exist, or be empty), all or nothing.

    The folder is assembled under a temporary name beside it and renamed into place, so an interrupted
    export leaves no half-written model. ``card`` is the README.md text, or a function of the final
    config (weights' checksum included) that writes it; ``extra_files`` (name -> text) go in too.

    Returns:
        The folder.
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ModelDirError(f"{directory} exists and is not an empty folder; choose another --out")
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    data = save_safetensors(state, metadata={"format": FORMAT})
    config = model_config(model, preset=preset, pretext=pretext, source=source)
    config["weights"] = {"file": WEIGHTS, "sha256": hashlib.sha256(data).hexdigest(), "tensors": len(state),
                         "values": sum(int(v.numel()) for v in state.values())}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # a model folder, readable as any folder the user makes (mkdtemp gives 0700)
    try:
        (tmp / WEIGHTS).write_bytes(data)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD).write_text(card(config) if callable(card) else card)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if directory.exists():
            directory.rmdir()  # empty, checked above
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """A model folder's config.json, checked (:class:`ModelDirError` names the folder and what is wrong)."""
    directory = Path(directory)
    path = directory / CONFIG
    if not directory.is_dir():
        raise ModelDirError(f"{directory} is not a model folder (export one with `medfl export RUN --out DIR`)")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelDirError(f"{directory} has no {CONFIG}: not an exported model (medfl export RUN --out DIR)") from None
    except (OSError, ValueError) as e:
        raise ModelDirError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelDirError(f"{path} is not a {FORMAT!r} config")
    if config.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(f"{path} has format version {config.get('format_version')!r}; this medformer-fl reads "
                            f"version {FORMAT_VERSION}")
    for key in ("model", "datasets", "heads", "preset"):
        if key not in config:
            raise ModelDirError(f"{path} lacks {key!r}")
    return config


def _register_datasets(config: Mapping[str, Any], where: str) -> list[tuple[str, int]]:
    """The model's datasets; imported ones this machine does not know are registered from their public card."""
    out = []
    for d in config["datasets"]:
        if d.get("card") is not None:
            register_public(d["card"], f"{where} (dataset {d.get('flag')!r})")
        info = get_info(d["flag"])
        if info.task != d["task"] or info.input_kind != d["input_kind"]:
            raise ModelDirError(f"{where}: dataset {d['flag']!r} was {d['task']} / {d['input_kind']} when exported, "
                                f"here it is {info.task} / {info.input_kind}")
        out.append((d["flag"], int(d["size"])))
    return out


#: MedformerConfig fields renamed after a version that exported them: old name -> the fields it became.
RENAMED_MODEL_FIELDS: dict[str, tuple[str, ...]] = {"stem_depth": ("stem_depth_2d", "stem_depth_3d")}


def _model_fields(exported: Mapping[str, Any]) -> dict[str, Any]:
    """An exported config's model fields under today's names."""
    fields = dict(exported)
    for old, new in RENAMED_MODEL_FIELDS.items():
        if old in fields:
            value = fields.pop(old)
            fields.update({name: value for name in new if name not in fields})
    return fields


def build_from_config(config: Mapping[str, Any], datasets: Iterable[DatasetRef] | None = None, *,
                      where: str = "config") -> Medformer:
    """A freshly initialised (seeded) Medformer of ``config``'s architecture, heads and probes, for its
    datasets, or for ``datasets`` (a superset: new datasets get new tokenizers, latents, pretext parts)."""
    try:
        cfg = MedformerConfig(**_model_fields(config["model"]))
    except (TypeError, ValueError) as e:
        raise ModelDirError(f"{where}: its architecture does not fit this medformer-fl's Medformer "
                            f"(exported by {config.get('library', {}).get('medformer-fl', '?')}): {e}") from None
    own = _register_datasets(config, where)
    datasets = normalise_datasets(own if datasets is None else datasets)
    pretext = config.get("pretext")
    heads = {f: h for f, h in config["heads"].items() if h.get("kind") == "task"}
    probes = {f: h for f, h in config["heads"].items() if h.get("kind") == "linear_probe"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        objective = PretextObjective(pretext["weights"], mask_ratio=pretext["mask_ratio"]) if pretext else None
        model = build_medformer(cfg, datasets, downstream_heads=bool(heads),
                                extra_outputs=objective.build_heads(cfg, datasets) if objective else {},
                                extra_inputs=objective.extra_inputs(datasets) if objective else ())
    for flag, _ in datasets:
        if flag not in heads and flag in model.outputs:
            del model.outputs[flag]
    for flag, p in probes.items():
        attach_probe(model, flag, LinearProbe(int(p["dim"]), int(p["num_outputs"]), p["activation"]))
    return model


def load_pretrained(directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> Medformer:
    """The Medformer exported to ``directory``, in eval mode, on ``device`` (``auto``, ``cpu``, ``cuda[:N]``).

    Raises:
        ModelDirError: not a model folder, damaged weights, or an architecture this version cannot build.
    """
    directory = Path(directory)
    config = read_config(directory)
    model = build_from_config(config, where=str(directory / CONFIG))
    state = read_weights(directory, config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelDirError(f"{directory / WEIGHTS} does not match the model its config describes: "
                            f"{' '.join(str(e).split())[:300]}") from None
    return model.to(resolve_device(device)).eval()


def read_weights(directory: str | os.PathLike, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """model.safetensors, checked against the SHA-256 config.json records."""
    path = Path(directory) / WEIGHTS
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelDirError(f"cannot read {path}: {e.strerror or e}") from None
    expected = (config.get("weights") or {}).get("sha256")
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise ModelDirError(f"{path} is damaged or modified: its SHA-256 differs from the one in {CONFIG}")
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError) as e:
        raise ModelDirError(f"{path} is not a safetensors file ({e})") from None


def with_datasets(model: Medformer, config: Mapping[str, Any], datasets: Iterable[DatasetRef]
                  ) -> tuple[Medformer, list[str]]:
    """``model`` extended to further datasets: the same weights, plus freshly initialised (seeded)
    tokenizers, latents and pretext-head parts for what it has never seen.

    Returns:
        The extended model (on ``model``'s device, in eval mode) and the names of its new tensors.
    """
    wanted = normalise_datasets([*model.datasets, *datasets])
    if wanted == normalise_datasets(model.datasets):
        return model, []
    bigger = build_from_config(config, wanted)
    for flag, probe in probes_of(model).items():  # loaded below
        attach_probe(bigger, flag, LinearProbe(int(probe.weight.shape[1]), int(probe.weight.shape[0]), probe.activation))
    result = bigger.load_state_dict(model.state_dict(), strict=False)
    if result.unexpected_keys:
        raise ModelDirError(f"cannot extend the model: tensors {result.unexpected_keys[:3]} have no place in it")
    return bigger.to(device_of(model)).eval(), list(result.missing_keys)


def new_parts(keys: Iterable[str]) -> dict[str, int]:
    """New tensors counted by sharing scope (``inputs.2d-1ch``, ``latents.<dataset>``, ``outputs.mae`` ...)."""
    out: dict[str, int] = {}
    for k in keys:
        out[scope_of(k)] = out.get(scope_of(k), 0) + 1
    return out
