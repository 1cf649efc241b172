"""The scenario schema: a YAML file describing one federation, as typed dataclasses.

A scenario names the hospitals (each a MedMNIST subset at one image size, optionally split into
several clients), the model preset, the pretext tasks, local training, the server strategy,
evaluation and privacy. Names that come from a registry (model presets, pretext tasks, accountants,
DP clipping methods, fault kinds) are checked against that registry itself. ``config.loader``
fills these dataclasses from YAML; ``config.build`` is the engine.

A leaf: it imports only the standard library, yaml and ``medformer`` (registries, the training
settings), never Flower or the apps.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, get_type_hints

import yaml

from config.errors import did_you_mean, show, type_name
from medformer import data as mdata
from medformer.device import DEVICE_CHOICES, is_device_spec
from medformer.dp.accounting import ACCOUNTANTS
from medformer.model import MedformerConfig, make_config, preset_names
from medformer.pretext import TASKS
from medformer.settings import setting
from medformer.train import TrainingSpec

StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedavgm", "median", "trimmed-mean"]
Weighting = Literal["examples", "sqrt-examples", "uniform"]
ClientDPMode = Literal["server", "client"]
PartitionMethod = Literal["iid", "dirichlet"]

#: Pretext task names a scenario may weight: the registry of medformer.pretext.
PRETEXT_TASKS: tuple[str, ...] = tuple(TASKS)
#: Tasks whose loss couples the examples of a batch (in-batch negatives): not DP-SGD compatible.
BATCH_COUPLED_TASKS: tuple[str, ...] = tuple(n for n, t in TASKS.items() if not t.per_sample)
#: Faults a chaos scenario may inject (client.faults implements each).
FAULT_KINDS: tuple[str, ...] = ("raise", "hang", "scale", "sign-flip", "nan", "extra-key")

_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


def _dataset_sizes() -> dict[str, tuple[int, ...]]:
    """Official image sizes of every known MedMNIST flag."""
    return {flag: tuple(info.sizes) for flag, info in mdata.REGISTRY.items()}


def _n_train(flag: str) -> int:
    return int(mdata.get_info(flag).n_samples["train"])


@dataclass(kw_only=True)
class ModelSpec:
    """Which Medformer to build.

    Attributes:
        preset: a preset of ``medformer.model.PRESETS`` (``tiny`` for tests, ``default``, ...).
        overrides: ``MedformerConfig`` fields replaced on top of the preset, e.g. ``{depth: 2}`` or
            ``{stem: conv, stem_3d_full_res: true}``; each is checked against the field's type, and
            the resulting config against the model's own rules, when the scenario loads.
    """

    preset: str = setting("default", choices=preset_names)
    overrides: dict[str, bool | int | float | str] = field(default_factory=dict)

    def _check(self) -> list[tuple[tuple, str]]:
        hints = get_type_hints(MedformerConfig)
        problems = []
        for k, v in self.overrides.items():
            if not k.isidentifier():
                problems.append((("overrides", k), f"override name {show(k)} is not an identifier"))
            elif k not in hints:
                problems.append((("overrides", k), f"unknown model field {show(k)}{did_you_mean(k, hints)}; "
                                                   f"choose from {', '.join(hints)}"))
            elif not _is_a(v, hints[k]):
                problems.append((("overrides", k), f"expected {type_name(hints[k])}, got {show(v)}"))
        if problems:
            return problems
        try:  # the model's own rules (positive sizes, heads dividing dim, a known stem)
            make_config(self.preset, **self.overrides)
        except ValueError as e:
            return [(("overrides",), str(e))]
        return []


def _is_a(value: Any, tp: type) -> bool:
    """``value`` fits a MedformerConfig field of type ``tp`` (an int fits a float; a bool fits only bool)."""
    if tp is bool or isinstance(value, bool):
        return tp is bool and isinstance(value, bool)
    return isinstance(value, (int, float)) if tp is float else isinstance(value, tp)


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
        weighting: site weights of the mean rules: ``examples`` (FedAvg), ``sqrt-examples`` or
            ``uniform`` (small sites keep a say on the keys they share with large ones).
    """

    name: StrategyName = "fedavg"
    proximal_mu: float = setting(0.0, ge=0, le=1e4)
    server_lr: float = setting(1.0, gt=0, le=100)
    server_momentum: float = setting(0.9, ge=0, lt=1)
    trim_fraction: float = setting(0.2, ge=0, lt=0.5)
    fraction_train: float = setting(1.0, gt=0, le=1)
    min_train_nodes: int = setting(1, ge=1)
    round_timeout: float = setting(3600.0, gt=0)
    update_clip_norm: float | None = setting(None, gt=0, le=1e6)
    weighting: Weighting = "examples"

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

    eval_every: int = setting(0, ge=0, le=10_000)
    linear_probe: bool = True
    fine_tune: bool = False
    fine_tune_epochs: int = setting(5, ge=1, le=1_000)
    label_fraction: float = setting(1.0, gt=0, le=1)
    max_train_examples: int | None = setting(None, ge=1)
    audit: bool = False
    audit_examples: int = setting(500, ge=10, le=100_000)


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

    target_epsilon: float | None = setting(None, gt=0, le=1e6)
    noise_multiplier: float | None = setting(None, ge=0, le=1e4)
    target_delta: float | None = setting(None, gt=0, lt=1)
    max_grad_norm: float = setting(1.0, gt=0, le=1e6)
    accountant: str = setting("rdp", choices=lambda: ACCOUNTANTS)

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

    noise_multiplier: float = setting(ge=0, le=1e4)
    clipping_norm: float = setting(gt=0, le=1e6)
    mode: ClientDPMode = "server"
    target_delta: float | None = setting(None, gt=0, lt=1)

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
        gpus_per_client: share of a GPU reserved per ClientApp (Flower's ``client-resources-num-gpus``)
            when the scenario's device is a GPU; null = one GPU shared by the ClientApps that run at
            once; 0 on a CPU device.
    """

    cpus_per_client: int = setting(1, ge=1, le=1_024)
    threads_per_client: int = setting(1, ge=1, le=1_024)
    gpus_per_client: float | None = setting(None, ge=0, le=64)


@dataclass(kw_only=True)
class PartitionSpec:
    """Split one hospital's train split into several clients.

    Attributes:
        parts: number of clients (>= 2).
        method: ``iid`` (shuffled equal split) or ``dirichlet`` (label skew).
        alpha: Dirichlet concentration (dirichlet only); smaller = more skewed.
    """

    parts: int = setting(ge=2, le=100_000)
    method: PartitionMethod = "iid"
    alpha: float = setting(0.5, gt=0, le=1e6)


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
            problems.append((("name",), f"bad hospital name {show(self.name)}; "
                             "use 1-64 letters, digits, '_' or '-'"))
        sizes = _dataset_sizes()
        if self.dataset not in sizes:
            problems.append((("dataset",), f"unknown dataset {show(self.dataset)}"
                             f"{did_you_mean(self.dataset, sizes)}; choose from "
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


def dataset_label(flag: str, size: int) -> str:
    """Key of a (flag, size) in reports and summaries: the flag at 28 pixels, ``flag_<size>`` otherwise."""
    return flag if size == 28 else f"{flag}_{size}"


@dataclass
class Site:
    """One hospital site, the same type everywhere: a scenario's client (a hospital, or one partition
    of a hospital's train split), the ClientApp's own identity, a site the server discovered, a
    SuperNode the loopback launcher starts.

    Attributes:
        name: unique name (``[A-Za-z0-9_-]+``).
        dataset: MedMNIST flag; size: image size.
        partition_index, partition_parts, partition_method, partition_alpha: which part of the
            train split this client holds (None: all of it).
        privacy: the scenario's DP-SGD request for this site (the site's own policy may tighten it).
        num_examples: training records (known after discovery).
        data_dir: where the site's files are (the site's own fact; None on the server).
    """

    name: str
    dataset: str
    size: int = 28
    partition_index: int | None = None
    partition_parts: int | None = None
    partition_method: str | None = None
    partition_alpha: float | None = None
    privacy: PrivacySpec | None = None
    num_examples: int | None = None
    data_dir: str | None = None

    @property
    def label(self) -> str:
        """Key of its dataset in reports (:func:`dataset_label`)."""
        return dataset_label(self.dataset, self.size)

    @property
    def partitioned(self) -> bool:
        return self.partition_parts is not None


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
    kind: str = setting(choices=lambda: FAULT_KINDS)
    rounds: list[int] = field(default_factory=list)
    factor: float = setting(10.0, gt=0, le=1e6)
    seconds: float = setting(60.0, ge=0, le=86_400)


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
        training: local training per round (``medformer.train.TrainingSpec``).
        strategy: server aggregation.
        evaluation: downstream evaluation.
        device: where training, DP-SGD and evaluation compute: ``auto`` (a GPU if there is one, else the
            CPU), ``cpu``, ``cuda`` or ``cuda:N``; each party resolves it on its own machine (a site's
            node-config ``device`` wins at that site).
        privacy: DP-SGD for every hospital that does not set its own; null = none.
        client_dp: client-level DP on updates; null = none.
        simulation: simulation engine resources.
        faults: injected client faults for chaos tests (none in production).
        hospitals: the hospitals, in order.
    """

    name: str
    seed: int = setting(0, ge=0, le=2**32 - 1)
    model: ModelSpec = field(default_factory=ModelSpec)
    pretext: dict[str, float] = field(default_factory=_default_pretext)
    mask_ratio: float = setting(0.75, gt=0, lt=1)
    training: TrainingSpec = field(default_factory=TrainingSpec)  # medformer.train: one class for all
    strategy: StrategySpec = field(default_factory=StrategySpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    device: str = "auto"
    privacy: PrivacySpec | None = None
    client_dp: ClientDPSpec | None = None
    simulation: SimulationSpec = field(default_factory=SimulationSpec)
    faults: list[FaultSpec] = field(default_factory=list)
    hospitals: list[HospitalSpec]

    # -- derived views ------------------------------------------------------------------------

    def clients(self) -> list[Site]:
        """The clients, in hospital order, partitioned hospitals expanded."""
        out = []
        for h in self.hospitals:
            privacy = h.privacy if h.privacy is not None else self.privacy
            p = h.partition
            if p is None:
                out.append(Site(h.name, h.dataset, h.size, privacy=privacy))
                continue
            alpha = p.alpha if p.method == "dirichlet" else None
            out.extend(
                Site(name, h.dataset, h.size, i, p.parts, p.method, alpha, privacy)
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
            problems.append((("name",), f"bad scenario name {show(self.name)}; use 1-100 "
                             "characters without '/', '\\' or control characters"))
        if not is_device_spec(self.device):
            problems.append((("device",), f"{show(self.device)} is not a device; choose {DEVICE_CHOICES}"))
        if not self.pretext:
            problems.append((("pretext",), f"needs at least one task; choose from "
                             f"{', '.join(PRETEXT_TASKS)}"))
        for task, weight in self.pretext.items():
            if task not in PRETEXT_TASKS:
                problems.append((("pretext", task), f"unknown pretext task {show(task)}"
                                 f"{did_you_mean(task, PRETEXT_TASKS)}; choose from "
                                 f"{', '.join(PRETEXT_TASKS)}"))
            elif weight <= 0:
                problems.append((("pretext", task), f"weight must be > 0, got {show(weight)}; "
                                 "remove the task to disable it"))
        if set(self.pretext) == {"bridge"}:
            problems.append((("pretext", "bridge"), "needs another task beside it (at 2D sites its loss "
                             "is 0); e.g. pretext: {mae: 1.0, bridge: 0.5}"))
        if not self.hospitals:
            problems.append((("hospitals",), "needs at least one hospital"))
            return problems

        seen: dict[str, int] = {}
        for i, h in enumerate(self.hospitals):
            if h.name in seen:
                problems.append((("hospitals", i, "name"), f"duplicate hospital name "
                                 f"{show(h.name)} (also hospitals[{seen[h.name]}])"))
            seen.setdefault(h.name, i)
        if len(seen) == len(self.hospitals):
            owner: dict[str, int] = {}
            for i, h in enumerate(self.hospitals):
                for c in h.client_names():
                    if c in owner and owner[c] != i:
                        problems.append((("hospitals", i, "name"), f"client name {show(c)} "
                                         f"collides with hospitals[{owner[c]}]; rename one"))
                    owner.setdefault(c, i)

        names = [c for h in self.hospitals for c in h.client_names()]
        for i, fault in enumerate(self.faults):
            if fault.hospital not in names:
                problems.append((("faults", i, "hospital"), f"no client named {show(fault.hospital)}"
                                 f"{did_you_mean(fault.hospital, names)}"))
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
                             f"'{private[0]}' uses privacy); drop it or use simsiam or distill"))

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
