"""Scenario schema: a YAML file describing one federation, validated into typed dataclasses.

A scenario names the hospitals (each a MedMNIST subset at one image size, optionally split into
several clients), the model preset, the pretext tasks, local training, the server strategy,
evaluation and privacy. The YAML only fills the dataclasses below; unknown keys are errors, and
every problem found is collected and reported at once in a single-line :class:`ScenarioError`.

This is a leaf module, read alike by the CLI, the ServerApp and the ClientApp: it imports only the
standard library, numpy, yaml and :mod:`medformer.data` (the dataset registry), never Flower,
torch or the apps.

Example:
    >>> s = load_scenario("simulations/configs/quickstart.yaml", ["training.rounds=2"])
    >>> [c.name for c in s.clients()]
    ['breast', 'pneumonia', 'retina']
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import numpy as np
import yaml

from medformer import data as mdata

__all__ = [
    "PRETEXT_TASKS",
    "ClientDPSpec",
    "ClientSpec",
    "EvaluationSpec",
    "HospitalSpec",
    "ModelSpec",
    "PartitionSpec",
    "PrivacySpec",
    "Scenario",
    "ScenarioError",
    "SimulationSpec",
    "StrategySpec",
    "TrainingSpec",
    "apply_overrides",
    "check_data_files",
    "load_scenario",
    "partition_indices",
    "scenario_from_dict",
]

Preset = Literal["tiny", "default", "base"]
Optimizer = Literal["adamw", "sgd"]
StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedavgm", "median", "trimmed-mean"]
Accountant = Literal["rdp", "prv"]
ClientDPMode = Literal["server", "client"]
PartitionMethod = Literal["iid", "dirichlet"]
PretextTask = Literal["mae", "rotation", "simsiam", "contrastive"]
FaultKind = Literal["raise", "hang", "scale", "sign-flip", "nan", "extra-key"]

#: Pretext task names a scenario may weight (keep in step with ``medformer.pretext``).
PRETEXT_TASKS: tuple[str, ...] = get_args(PretextTask)
#: Tasks whose loss couples the examples of a batch (InfoNCE negatives): not DP-SGD compatible.
BATCH_COUPLED_TASKS: tuple[str, ...] = ("contrastive",)

_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
# PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; accept it where a float is expected.
_EXP_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


# ----------------------------------------------------------------------------------------------
# errors


class ScenarioError(ValueError):
    """Raised when a scenario (file, dict or ``--set`` override) is invalid.

    ``str(err)`` is one line: the first problem (``field.path: what is wrong``), followed by
    ``(and N more: ...)`` when there are several. All problems are in ``err.problems``.
    """

    def __init__(self, problems: Sequence[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if not self.problems:
            raise ValueError("ScenarioError needs at least one problem")
        message = self.problems[0]
        if len(self.problems) > 1:
            rest = self.problems[1:]
            message += f" (and {len(rest)} more: {'; '.join(rest)})"
        super().__init__(message)


def _show(value: Any, limit: int = 60) -> str:
    """Short one-line rendering of a YAML value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _join(path: str, key: Any) -> str:
    """Append one key (dict key, field name or list index) to a field path."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{path}[{key}]"
    if isinstance(key, str) and _KEY_RE.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{_show(key)}]"


def _did_you_mean(word: Any, choices: Iterable[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ----------------------------------------------------------------------------------------------
# dataset registry (medformer.data)


def _dataset_sizes() -> dict[str, tuple[int, ...]]:
    """Official image sizes of every known MedMNIST flag."""
    return {flag: tuple(info.sizes) for flag, info in mdata.REGISTRY.items()}


def _n_train(flag: str) -> int:
    return int(mdata.get_info(flag).n_samples["train"])


# ----------------------------------------------------------------------------------------------
# schema


def _f(default: Any = MISSING, *, factory: Any = MISSING, ge=None, gt=None, le=None, lt=None):
    """A dataclass field with numeric bounds kept in its metadata (checked on load)."""
    return field(default=default, default_factory=factory, metadata={"bounds": (ge, gt, le, lt)})


@dataclass(kw_only=True)
class ModelSpec:
    """Which Medformer to build.

    Attributes:
        preset: size preset, ``tiny`` (tests), ``default`` (CPU-friendly) or ``base``.
        overrides: config keys replaced on top of the preset, e.g. ``{depth: 2}``; the model
            validates names and values, here only: keys are identifiers, values numbers.
    """

    preset: Preset = "default"
    overrides: dict[str, int | float] = field(default_factory=dict)

    def _check(self) -> list[tuple[tuple, str]]:
        return [
            (("overrides", k), f"override name {_show(k)} is not an identifier")
            for k in self.overrides
            if not k.isidentifier()
        ]


@dataclass(kw_only=True)
class TrainingSpec:
    """Local training on each hospital, per round.

    Attributes:
        rounds: number of federated rounds.
        local_epochs: passes over the local train split per round (fractions allowed).
        local_steps: optimizer steps per round; when set it replaces ``local_epochs``.
        batch_size: examples per local step (expected batch size under DP-SGD's Poisson sampling).
        lr: local learning rate.
        weight_decay: decoupled weight decay (AdamW) or L2 (SGD).
        optimizer: ``adamw`` or ``sgd``.
        keep_optimizer_state: keep each hospital's optimizer state across rounds.
    """

    rounds: int = _f(3, ge=1, le=10_000)
    local_epochs: float = _f(1.0, gt=0, le=1_000)
    local_steps: int | None = _f(None, ge=1, le=10_000_000)
    batch_size: int = _f(128, ge=1, le=65_536)
    lr: float = _f(1.0e-3, gt=0, le=10)
    weight_decay: float = _f(0.05, ge=0, le=10)
    optimizer: Optimizer = "adamw"
    keep_optimizer_state: bool = False


@dataclass(kw_only=True)
class StrategySpec:
    """Server-side aggregation.

    Attributes:
        name: ``fedavg``, ``fedprox``, ``fedadam``, ``fedavgm``, ``median`` or ``trimmed-mean``.
        proximal_mu: FedProx proximal term weight (must be > 0 for ``fedprox``).
        server_lr: server learning rate (FedAdam, FedAvgM).
        server_momentum: server momentum (FedAvgM).
        trim_fraction: fraction trimmed at each end (trimmed-mean).
        fraction_train: fraction of clients sampled each round.
        min_train_nodes: fewest clients a round trains on.
        round_timeout: seconds the server waits for replies in one round.
        update_clip_norm: clip each hospital's update (reply - what it was sent) to this L2 norm
            before aggregation, a cheap defence against a scaled (poisoned) update; null = off.
    """

    name: StrategyName = "fedavg"
    proximal_mu: float = _f(0.0, ge=0, le=1e4)
    server_lr: float = _f(1.0, gt=0, le=100)
    server_momentum: float = _f(0.9, ge=0, lt=1)
    trim_fraction: float = _f(0.2, ge=0, lt=0.5)
    fraction_train: float = _f(1.0, gt=0, le=1)
    min_train_nodes: int = _f(1, ge=1)
    round_timeout: float = _f(3600.0, gt=0)
    update_clip_norm: float | None = _f(None, gt=0, le=1e6)

    def _check(self) -> list[tuple[tuple, str]]:
        if self.name == "fedprox" and self.proximal_mu <= 0:
            return [(("proximal_mu",), "strategy 'fedprox' needs proximal_mu > 0 (e.g. 0.01)")]
        if self.name != "fedprox" and self.proximal_mu > 0:
            warnings.warn(
                f"strategy.proximal_mu={self.proximal_mu} is ignored by strategy "
                f"'{self.name}'; set strategy.name=fedprox to use it",
                stacklevel=2,
            )
        return []


@dataclass(kw_only=True)
class EvaluationSpec:
    """Centralized downstream evaluation of the aggregated encoder.

    Attributes:
        eval_every: evaluate every this many rounds; 0 = only after the last round.
        linear_probe: fit a linear head on frozen features.
        fine_tune: also fine-tune the whole encoder.
        fine_tune_epochs: epochs of fine-tuning.
        label_fraction: fraction of labelled train examples the probe / fine-tune may use.
        max_train_examples: cap on probe training examples (speed); null = no cap.
        audit: after the last round, run a membership-inference attack on the global model for each
            hospital (its training images against held-out validation images) and report the attack's
            AUC and TPR at 1% FPR (``medformer.audit``).
        audit_examples: members (and as many non-members) per hospital the audit scores, at most.
    """

    eval_every: int = _f(0, ge=0, le=10_000)
    linear_probe: bool = True
    fine_tune: bool = False
    fine_tune_epochs: int = _f(5, ge=1, le=1_000)
    label_fraction: float = _f(1.0, gt=0, le=1)
    max_train_examples: int | None = _f(None, ge=1)
    audit: bool = False
    audit_examples: int = _f(500, ge=10, le=100_000)


@dataclass(kw_only=True)
class PrivacySpec:
    """Example-level DP-SGD (Opacus) on a hospital. Exactly one of ``target_epsilon`` and
    ``noise_multiplier`` is set.

    Attributes:
        target_epsilon: epsilon to reach after all rounds (noise calibrated to it).
        noise_multiplier: noise std as a multiple of ``max_grad_norm`` (epsilon then reported).
        target_delta: delta; null = chosen later, below 1/n for the hospital's n examples.
        max_grad_norm: per-sample gradient clipping norm (L2).
        accountant: ``rdp`` or ``prv``.
    """

    target_epsilon: float | None = _f(None, gt=0, le=1e6)
    noise_multiplier: float | None = _f(None, ge=0, le=1e4)
    target_delta: float | None = _f(None, gt=0, lt=1)
    max_grad_norm: float = _f(1.0, gt=0, le=1e6)
    accountant: Accountant = "rdp"

    def _check(self) -> list[tuple[tuple, str]]:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            got = "neither" if self.target_epsilon is None else "both"
            return [((), f"set exactly one of target_epsilon (noise calibrated to it) or "
                     f"noise_multiplier (epsilon reported), got {got}")]
        return []


@dataclass(kw_only=True)
class ClientDPSpec:
    """Client-level DP on the model updates (DP-FedAvg; ``server.client_dp``).

    Each hospital's update is clipped to ``clipping_norm`` and the average is noised; the
    client-level epsilon (at ``target_delta``) is reported in ``summary.json["client_dp"]``.

    Attributes:
        noise_multiplier: noise std as a multiple of ``clipping_norm``.
        clipping_norm: L2 clipping norm of each client's update.
        mode: clip on the ``server`` (supported) or on each ``client`` (not yet: needs a ClientApp mod).
        target_delta: delta the client-level epsilon is reported at; null = 1e-5 (1/(100 n) above
            1,000 hospitals: ``server.client_dp.default_client_delta``).
    """

    noise_multiplier: float = _f(ge=0, le=1e4)
    clipping_norm: float = _f(gt=0, le=1e6)
    mode: ClientDPMode = "server"
    target_delta: float | None = _f(None, gt=0, lt=1)

    def _check(self) -> list[tuple[tuple, str]]:
        if self.mode == "client":
            return [(("mode",), "'client' is not supported yet: hospitals do not clip their own updates "
                     "(that needs a clipping mod in the ClientApp); use mode: server, where the server "
                     "clips each update before averaging")]
        return []


@dataclass(kw_only=True)
class SimulationSpec:
    """Resources of Flower's simulation engine.

    Attributes:
        cpus_per_client: CPUs reserved per ClientApp (sets how many run at once).
        threads_per_client: torch threads inside one ClientApp.
    """

    cpus_per_client: int = _f(1, ge=1, le=1_024)
    threads_per_client: int = _f(1, ge=1, le=1_024)


@dataclass(kw_only=True)
class PartitionSpec:
    """Split one hospital's train split into several clients.

    Attributes:
        parts: number of clients (>= 2).
        method: ``iid`` (shuffled equal split) or ``dirichlet`` (label skew).
        alpha: Dirichlet concentration (dirichlet only); smaller = more skewed.
    """

    parts: int = _f(ge=2, le=100_000)
    method: PartitionMethod = "iid"
    alpha: float = _f(0.5, gt=0, le=1e6)


@dataclass(kw_only=True)
class HospitalSpec:
    """One hospital: a MedMNIST subset at one size, optionally partitioned into clients.

    Attributes:
        name: unique name, ``[A-Za-z0-9_-]+``.
        dataset: MedMNIST flag, e.g. ``breastmnist``.
        size: image size, one of the dataset's official sizes.
        privacy: DP-SGD settings for this hospital, overriding the scenario's ``privacy``.
        partition: split into clients ``<name>-0`` .. ``<name>-<parts-1>``.
    """

    name: str
    dataset: str
    size: int = 28
    privacy: PrivacySpec | None = None
    partition: PartitionSpec | None = None

    def _check(self) -> list[tuple[tuple, str]]:
        problems = []
        if not _NAME_RE.fullmatch(self.name) or len(self.name) > 64:
            problems.append((("name",), f"bad hospital name {_show(self.name)}; "
                             "use 1-64 letters, digits, '_' or '-'"))
        sizes = _dataset_sizes()
        if self.dataset not in sizes:
            problems.append((("dataset",), f"unknown dataset {_show(self.dataset)}"
                             f"{_did_you_mean(self.dataset, sizes)}; choose from "
                             f"{', '.join(sorted(sizes))}"))
            return problems
        if self.size not in sizes[self.dataset]:
            choices = ", ".join(map(str, sizes[self.dataset]))
            problems.append((("size",), f"size {self.size} is not available for "
                             f"{self.dataset}; choose from {choices}"))
        if self.partition is not None:
            n = _n_train(self.dataset)
            if self.partition.parts > n:
                problems.append((("partition", "parts"), f"{self.partition.parts} parts exceed "
                                 f"the {n} training examples of {self.dataset}"))
        return problems

    def client_names(self) -> list[str]:
        """Names of the clients this hospital becomes."""
        if self.partition is None:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(self.partition.parts)]


@dataclass
class ClientSpec:
    """One simulated client (a hospital, or one partition of a hospital's train split)."""

    name: str
    dataset: str
    size: int
    partition_index: int | None = None
    partition_parts: int | None = None
    partition_method: str | None = None
    partition_alpha: float | None = None
    privacy: PrivacySpec | None = None


@dataclass(kw_only=True)
class FaultSpec:
    """A fault injected into one client (chaos testing; production scenarios declare none).

    Attributes:
        hospital: the client's name (a hospital, or ``<name>-<i>`` for a partition).
        kind: ``raise`` (the ClientApp fails), ``hang`` (answers after ``seconds``), ``scale`` /
            ``sign-flip`` (its update times ``factor`` / ``-factor``: a poisoned hospital), ``nan``
            (a tensor of NaN), ``extra-key`` (a key outside its scope).
        rounds: rounds the fault strikes; empty = every round.
        factor: update multiplier for ``scale`` and ``sign-flip``.
        seconds: delay for ``hang``.
    """

    hospital: str
    kind: FaultKind
    rounds: list[int] = field(default_factory=list)
    factor: float = _f(10.0, gt=0, le=1e6)
    seconds: float = _f(60.0, ge=0, le=86_400)


def _default_pretext() -> dict[str, float]:
    return {"mae": 1.0, "rotation": 0.5}


@dataclass(kw_only=True)
class Scenario:
    """A whole federation: hospitals, model, pretext tasks, training, strategy and evaluation.

    Attributes:
        name: scenario name (used in output folders and reports).
        seed: one seed for partitioning, model init and sampling.
        model: model preset and overrides.
        pretext: pretext task name -> loss weight (> 0).
        mask_ratio: fraction of patches masked by masked reconstruction (``mae``).
        training: local training per round.
        strategy: server aggregation.
        evaluation: downstream evaluation.
        privacy: DP-SGD for every hospital that does not set its own; null = none.
        client_dp: client-level DP on updates; null = none.
        simulation: simulation engine resources.
        faults: injected client faults for chaos tests (none in production).
        hospitals: the hospitals, in order.
    """

    name: str
    seed: int = _f(0, ge=0, le=2**32 - 1)
    model: ModelSpec = field(default_factory=ModelSpec)
    pretext: dict[str, float] = field(default_factory=_default_pretext)
    mask_ratio: float = _f(0.75, gt=0, lt=1)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    strategy: StrategySpec = field(default_factory=StrategySpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    privacy: PrivacySpec | None = None
    client_dp: ClientDPSpec | None = None
    simulation: SimulationSpec = field(default_factory=SimulationSpec)
    faults: list[FaultSpec] = field(default_factory=list)
    hospitals: list[HospitalSpec]

    # -- derived views ------------------------------------------------------------------------

    def clients(self) -> list[ClientSpec]:
        """The clients, in hospital order, partitioned hospitals expanded."""
        out = []
        for h in self.hospitals:
            privacy = h.privacy if h.privacy is not None else self.privacy
            p = h.partition
            if p is None:
                out.append(ClientSpec(h.name, h.dataset, h.size, privacy=privacy))
                continue
            alpha = p.alpha if p.method == "dirichlet" else None
            out.extend(
                ClientSpec(name, h.dataset, h.size, i, p.parts, p.method, alpha, privacy)
                for i, name in enumerate(h.client_names())
            )
        return out

    def datasets(self) -> list[tuple[str, int]]:
        """Unique ``(flag, size)`` pairs, in hospital order."""
        return list(dict.fromkeys((h.dataset, h.size) for h in self.hospitals))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON ready); ``scenario_from_dict(s.to_dict()) == s``."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved scenario as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # -- cross-field checks -------------------------------------------------------------------

    def _check(self) -> list[tuple[tuple, str]]:
        problems: list[tuple[tuple, str]] = []
        if not self.name or len(self.name) > 100 or re.search(r"[/\\\x00-\x1f]", self.name):
            problems.append((("name",), f"bad scenario name {_show(self.name)}; use 1-100 "
                             "characters without '/', '\\' or control characters"))
        if not self.pretext:
            problems.append((("pretext",), f"needs at least one task; choose from "
                             f"{', '.join(PRETEXT_TASKS)}"))
        for task, weight in self.pretext.items():
            if task not in PRETEXT_TASKS:
                problems.append((("pretext", task), f"unknown pretext task {_show(task)}"
                                 f"{_did_you_mean(task, PRETEXT_TASKS)}; choose from "
                                 f"{', '.join(PRETEXT_TASKS)}"))
            elif weight <= 0:
                problems.append((("pretext", task), f"weight must be > 0, got {_show(weight)}; "
                                 "remove the task to disable it"))
        if not self.hospitals:
            problems.append((("hospitals",), "needs at least one hospital"))
            return problems

        seen: dict[str, int] = {}
        for i, h in enumerate(self.hospitals):
            if h.name in seen:
                problems.append((("hospitals", i, "name"), f"duplicate hospital name "
                                 f"{_show(h.name)} (also hospitals[{seen[h.name]}])"))
            seen.setdefault(h.name, i)
        if len(seen) == len(self.hospitals):
            owner: dict[str, int] = {}
            for i, h in enumerate(self.hospitals):
                for c in h.client_names():
                    if c in owner and owner[c] != i:
                        problems.append((("hospitals", i, "name"), f"client name {_show(c)} "
                                         f"collides with hospitals[{owner[c]}]; rename one"))
                    owner.setdefault(c, i)

        names = [c for h in self.hospitals for c in h.client_names()]
        for i, fault in enumerate(self.faults):
            if fault.hospital not in names:
                problems.append((("faults", i, "hospital"), f"no client named {_show(fault.hospital)}"
                                 f"{_did_you_mean(fault.hospital, names)}"))
            bad = [r for r in fault.rounds if not 1 <= r <= self.training.rounds]
            if bad:
                problems.append((("faults", i, "rounds"), f"rounds {bad} are outside 1..{self.training.rounds}"))

        n_clients = sum(len(h.client_names()) for h in self.hospitals)
        if self.strategy.min_train_nodes > n_clients:
            problems.append((("strategy", "min_train_nodes"), f"{self.strategy.min_train_nodes} "
                             f"exceeds the {n_clients} clients of this scenario"))

        coupled = [t for t in BATCH_COUPLED_TASKS if t in self.pretext]
        private = [h.name for h in self.hospitals if (h.privacy or self.privacy) is not None]
        for task in coupled if private else ():
            problems.append((("pretext", task), f"task '{task}' couples the examples of a batch, "
                             f"so DP-SGD cannot bound per-example privacy (hospital "
                             f"'{private[0]}' uses privacy); drop it or use simsiam"))

        if self.client_dp is not None and self.strategy.name in ("median", "trimmed-mean"):
            problems.append((("client_dp",), f"client-level DP needs a mean-based strategy, not "
                             f"'{self.strategy.name}': its noise is calibrated to an average of clipped "
                             "updates; use fedavg, fedprox, fedavgm or fedadam"))

        whole = {}
        for h in self.hospitals:
            if h.partition is None and h.dataset in whole:
                warnings.warn(
                    f"hospitals '{whole[h.dataset]}' and '{h.name}' both hold the whole train "
                    f"split of {h.dataset}: their data are the same images; use partition to "
                    "split one dataset across clients",
                    stacklevel=2,
                )
            whole.setdefault(h.dataset, h.name)
        return problems


# ----------------------------------------------------------------------------------------------
# building dataclasses from plain data, collecting every problem


class _Bad:
    """Marker for a value that failed validation (its problem is already recorded)."""


_BAD = _Bad()


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)",
            str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _check_bounds(value: float, bounds: tuple, path: str, problems: list[str]) -> bool:
    ge, gt, le, lt = bounds
    parts = []
    if ge is not None:
        parts.append(f">= {ge}")
    if gt is not None:
        parts.append(f"> {gt}")
    if le is not None:
        parts.append(f"<= {le}")
    if lt is not None:
        parts.append(f"< {lt}")
    ok = ((ge is None or value >= ge) and (gt is None or value > gt)
          and (le is None or value <= le) and (lt is None or value < lt))
    if not ok:
        problems.append(f"{path}: must be {' and '.join(parts)}, got {_show(value)}")
    return ok


def _build(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """Convert ``value`` to type ``tp``; on failure record a problem and return ``_BAD``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        rest = tuple(a for a in args if a is not type(None))
        if set(rest) == {int, float}:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            return _build(float, value, path, problems)
        if len(rest) == 1:
            return _build(rest[0], value, path, problems)
        raise TypeError(f"unsupported schema type {tp}")  # a bug in the schema, not the YAML
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, str) and value in choices:
            return value
        problems.append(f"{path}: expected one of {', '.join(map(repr, choices))}, got "
                        f"{_show(value)}{_did_you_mean(value, choices)}")
        return _BAD
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str) and _EXP_FLOAT_RE.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if math.isfinite(number):
                return number
            problems.append(f"{path}: expected a finite number, got {_show(value)}")
            return _BAD
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path, problems)
    elif origin is dict:
        return _build_dict(tp, value, path, problems)
    elif origin is list:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {_show(value)}")
            return _BAD
        items = [_build(get_args(tp)[0], v, _join(path, i), problems) for i, v in enumerate(value)]
        return _BAD if any(x is _BAD for x in items) else items
    else:
        raise TypeError(f"unsupported schema type {tp}")
    problems.append(f"{path}: expected {_type_name(tp)}, got {_show(value)}")
    return _BAD


def _build_dict(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, Mapping):
        problems.append(f"{path}: expected a mapping, got {_show(value)}")
        return _BAD
    out, bad = {}, False
    for key, v in value.items():
        if not isinstance(key, str):
            problems.append(f"{_join(path, key)}: keys must be strings, got {_show(key)}")
            bad = True
            continue
        out[key] = _build(get_args(tp)[1], v, _join(path, key), problems)
        bad |= out[key] is _BAD
    return _BAD if bad else out


def _build_dataclass(cls: type, value: Any, path: str, problems: list[str]) -> Any:
    where = path or "scenario"
    if not isinstance(value, Mapping):
        problems.append(f"{where}: expected a mapping, got {_show(value)}")
        return _BAD
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    bad = False
    for key in value:
        if key not in fields:
            problems.append(f"{_join(path, key)}: unknown key{_did_you_mean(key, fields)}; "
                            f"{where} takes {', '.join(fields)}")
            bad = True
    kwargs = {}
    for name, f in fields.items():
        sub = _join(path, name)
        if name not in value:
            if f.default is MISSING and f.default_factory is MISSING:
                problems.append(f"{sub}: missing required field")
                bad = True
            continue
        v = _build(hints[name], value[name], sub, problems)
        bounds = f.metadata.get("bounds")
        if v is not _BAD and v is not None and bounds:
            v = v if _check_bounds(v, bounds, sub, problems) else _BAD
        kwargs[name] = v
        bad |= v is _BAD
    if bad:
        return _BAD
    obj = cls(**kwargs)
    check = getattr(obj, "_check", None)
    for keys, message in check() if check else ():
        sub = path
        for k in keys:
            sub = _join(sub, k)
        problems.append(f"{sub or where}: {message}")
        bad = True
    return _BAD if bad else obj


# ----------------------------------------------------------------------------------------------
# public entry points


def scenario_from_dict(d: Mapping[str, Any]) -> Scenario:
    """Validate a plain dict (as from YAML) into a :class:`Scenario`.

    Raises:
        ScenarioError: listing every problem found, each naming its field path.
    """
    problems: list[str] = []
    scenario = _build(Scenario, d, "", problems)
    if problems or scenario is _BAD:
        raise ScenarioError(problems or ["scenario: invalid"])
    return scenario


def apply_overrides(d: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``d`` with ``dotted.key=value`` overrides applied.

    Values are parsed as YAML (``training.rounds=2``, ``privacy=null``, ``pretext={mae: 1}``).
    List items are addressed by index (``hospitals.0.size=64``); missing sections are created.

    Raises:
        ScenarioError: for a malformed override or a key path the schema does not have.
    """
    data = copy.deepcopy(dict(d))
    problems = []
    for item in overrides:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not key.isprintable():  # keep the error one line: show control characters escaped
            problems.append(f"--set {_show(key)}: key has control characters")
            continue
        if not sep or not key:
            problems.append(f"--set {_show(item)}: expected dotted.key=value")
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            problems.append(f"--set {key}: value {_show(text)} is not valid YAML "
                            f"({str(e).splitlines()[0]})")
            continue
        problem = _set_path(data, key.split("."), value)
        if problem:
            problems.append(f"--set {key}: {problem}")
    if problems:
        raise ScenarioError(problems)
    return data


def _unwrap_optional(tp: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _set_path(data: dict, segments: list[str], value: Any) -> str | None:
    """Set ``value`` at ``segments`` in ``data``, walking the schema; return a problem or None."""
    tp: Any = Scenario
    node: Any = data
    path = ""
    for i, seg in enumerate(segments):
        tp = _unwrap_optional(tp)
        key: Any = seg
        if dataclasses.is_dataclass(tp):
            hints = get_type_hints(tp)
            if seg not in hints:
                return (f"unknown key {_show(seg)} in {path or 'scenario'}"
                        f"{_did_you_mean(seg, hints)}; choose from {', '.join(hints)}")
            child_tp = hints[seg]
        elif get_origin(tp) is dict:
            child_tp = get_args(tp)[1]
        elif get_origin(tp) is list:
            if not seg.isdigit():
                return f"{path} is a list; expected an index, got {_show(seg)}"
            key, child_tp = int(seg), get_args(tp)[0]
            if not isinstance(node, list) or key >= len(node):
                count = len(node) if isinstance(node, list) else 0
                return f"index {key} out of range; {path} has {count} item(s)"
        else:  # unreachable: a scalar is refused before descending into it
            return f"{path} is a single value, not a section"
        if i == len(segments) - 1:
            node[key] = value
            return None
        inner = _unwrap_optional(child_tp)
        if get_origin(inner) is list:
            wants = list
        elif dataclasses.is_dataclass(inner) or get_origin(inner) is dict:
            wants = dict
        else:
            return f"{_join(path, key)} is a single value, not a section"
        child = node[key] if isinstance(node, list) else node.get(key)
        if child is None and wants is dict:
            child = node[key] = {}
        if not isinstance(child, wants):
            kind = "a list" if wants is list else "a section"
            return f"{_join(path, key)} is {_show(child)}, not {kind}"
        node, tp, path = child, child_tp, _join(path, key)
    return None


def load_scenario(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Scenario:
    """Read a scenario YAML file, apply ``--set`` overrides, and validate it.

    Args:
        path: the YAML file.
        overrides: ``dotted.key=value`` strings applied after reading, before validation.

    Raises:
        ScenarioError: unreadable file, YAML syntax error, a top level that is not a mapping,
            a bad override, or any schema problem (all reported at once).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError(f"{path}: cannot read scenario file ({e})") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ScenarioError(f"{path}: invalid YAML{where}: {what}") from e
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else _show(raw)
        raise ScenarioError(f"{path}: expected a mapping of scenario fields at top level, "
                            f"got {got}")
    return scenario_from_dict(apply_overrides(raw, overrides))


def check_data_files(scenario: Scenario, data_dir: str | os.PathLike | None = None) -> None:
    """Check that every ``(dataset, size)`` file of the scenario exists and matches its MD5.

    Every file is checked before raising; the first failure is raised (its message names the
    file) with the other failures attached as notes.

    Raises:
        medformer.data.DataError: a file is missing or fails its checksum.
    """
    root = mdata.resolve_data_dir(data_dir)
    errors = []
    for flag, size in scenario.datasets():
        try:
            mdata.dataset_path(flag, size, root, download=False, verify=True)
        except mdata.DataError as e:
            errors.append(e)
    if errors:
        for other in errors[1:]:
            errors[0].add_note(f"also: {other}")
        raise errors[0]


# ----------------------------------------------------------------------------------------------
# partitioning a train split across clients

_MAX_DIRICHLET_DRAWS = 100


def _class_ids(labels: np.ndarray) -> np.ndarray:
    """One class id per example; multi-label rows are mapped to ids of their unique label sets."""
    labels = np.asarray(labels)
    if labels.ndim <= 1 or (labels.ndim == 2 and labels.shape[1] == 1):
        return labels.reshape(-1)
    return np.unique(labels.reshape(len(labels), -1), axis=0, return_inverse=True)[1].reshape(-1)


def partition_indices(
    labels: np.ndarray, parts: int, method: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Split example indices ``0..N-1`` into ``parts`` disjoint, non-empty, sorted index arrays.

    ``iid`` shuffles and splits into near-equal parts. ``dirichlet`` is the usual label-skew split
    (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution"; implemented per
    class as in Yurochkin et al. 2019 and NIID-Bench): for each class, proportions
    ``p ~ Dir(alpha * 1_parts)`` decide how its shuffled examples are cut across the parts.
    Draws are repeated until no part is empty; after ``100`` tries the examples needed are moved
    from the largest parts. Every index is used exactly once; the result depends only on the
    arguments.

    Args:
        labels: ``[N]`` or ``[N, 1]`` class labels, or ``[N, K]`` multi-label rows.
        parts: number of parts (>= 1, <= N).
        method: ``"iid"`` or ``"dirichlet"``.
        alpha: Dirichlet concentration (> 0); smaller is more skewed. Ignored for ``iid``.
        seed: seed of the generator.

    Returns:
        ``parts`` int64 arrays of indices into ``labels``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not isinstance(parts, (int, np.integer)) or isinstance(parts, bool) or parts < 1:
        raise ValueError(f"parts must be a positive integer, got {parts!r}")
    if n < parts:
        raise ValueError(f"cannot split {n} examples into {parts} non-empty parts")
    rng = np.random.default_rng(seed)
    if method == "iid":
        return [np.sort(p).astype(np.int64) for p in np.array_split(rng.permutation(n), parts)]
    if method != "dirichlet":
        raise ValueError(f"unknown partition method {method!r}; choose from 'iid', 'dirichlet'")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")

    classes = _class_ids(labels)
    members = [np.flatnonzero(classes == c) for c in np.unique(classes)]
    for _ in range(_MAX_DIRICHLET_DRAWS):
        buckets: list[list[np.ndarray]] = [[] for _ in range(parts)]
        for idx in members:
            p = np.nan_to_num(rng.dirichlet(np.full(parts, float(alpha))))
            p = p / p.sum() if p.sum() > 0 else np.full(parts, 1.0 / parts)
            cuts = np.floor(np.cumsum(p)[:-1] * len(idx)).astype(int)
            for bucket, chunk in zip(buckets, np.split(rng.permutation(idx), cuts)):
                bucket.append(chunk)
        out = [np.concatenate(b) for b in buckets]
        if min(len(o) for o in out) > 0:
            break
    else:
        # Rare (tiny N or alpha): move one random example from the largest part to each empty one.
        for j in range(parts):
            if len(out[j]) == 0:
                big = int(np.argmax([len(o) for o in out]))
                k = int(rng.integers(len(out[big])))
                out[j] = out[big][k : k + 1]
                out[big] = np.delete(out[big], k)
    return [np.sort(o).astype(np.int64) for o in out]
