"""What crosses the wire between the ServerApp and a hospital's ClientApp: every message key, and the
typed round instructions (no Flower import).

Discovery (a ``query`` message): the server sends ``config`` = {``roster``: JSON of the simulated
sites, the scenario seed and data folder}; the site replies ``site`` = {``site``: JSON of its
:class:`~config.Site`, ``num-examples``, and for a dataset of its own images ``dataset-card``: the
card's public part (task, labels, channels, sizes; no checksums or counts), so that the server can
build the model for a dataset it has no files of}.

A round (a ``train`` message): the server sends ``arrays`` (only the keys that site uses) and
``config`` = {``instructions``: JSON of :class:`RoundInstructions`, ``server-round``}. The site
replies ``arrays`` (the keys it trained), ``metrics`` (scalars, always ``num-examples``; under DP-SGD
only ``num-examples`` and ``steps``), ``privacy`` (under DP-SGD: the accountant history and the
epsilon it gives, public numbers the server checkpoints) and, when it will not train, ``refusal``
(``{"reason": ...}``). Images and labels never appear here.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from config import FaultSpec, ModelSpec, PrivacySpec, Site, from_plain
from medformer.train import TrainingSpec

# records of a message
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
PRIVACY = "privacy"
REFUSAL = "refusal"
SITE = "site"
DATASET_CARD = "dataset-card"
# keys inside them
INSTRUCTIONS = "instructions"
SERVER_ROUND = "server-round"
ROSTER = "roster"
NUM_EXAMPLES = "num-examples"
STEPS = "steps"
REASON = "reason"


@dataclass
class RoundInstructions:
    """One round's orders for one site.

    Attributes:
        round: this round (1-based); ``training.rounds`` is the federation's total (DP calibration).
        seed: the scenario seed (with the site name and round it seeds the site's reproducible RNG;
            never its DP noise).
        site: the server's view of the site (name, dataset, size, partition); a deployed site's own
            node-config wins.
        model: preset and overrides.
        pretext: task -> weight; mask_ratio: for ``mae``.
        training: the training settings.
        proximal_mu: FedProx's coefficient (0 = off).
        threads: torch threads the site should use (simulation).
        device: where the site computes (``auto``, ``cpu``, ``cuda[:N]``); its node-config ``device`` wins.
        privacy: the server's DP-SGD request, or None; the site's own policy may tighten it.
        privacy_state: the accountant history the server last saw from this site (resume).
        data_dir: where the server expects the data (simulation); a site's node-config wins.
        fault: an injected fault (chaos scenarios; only the simulation's chaos app obeys it).
    """

    round: int
    seed: int
    site: Site
    model: ModelSpec
    pretext: dict[str, float]
    mask_ratio: float
    training: TrainingSpec
    proximal_mu: float = 0.0
    threads: int = 1
    device: str = "auto"
    privacy: PrivacySpec | None = None
    privacy_state: str | None = None
    data_dir: str | None = None
    fault: FaultSpec | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RoundInstructions":
        """Parse and validate (one-line ScenarioError naming the bad field): a site checks its orders."""
        return from_plain(cls, json.loads(text), "instructions")
