"""What crosses the wire between the ServerApp and a hospital's ClientApp (no Flower import).

A train message carries ``arrays`` (only the keys that hospital uses) and ``config`` with one JSON
field, ``instructions``: everything the hospital needs to run the round. The reply carries
``arrays`` (the keys it trained), ``metrics`` (scalars, always ``num-examples``; under DP-SGD only
``num-examples`` and ``steps``), ``privacy`` (under DP-SGD: the accountant history and the epsilon it
gives, public numbers the server checkpoints) and, when the site will not train, ``refusal``
(``{"reason": ...}``). Images and labels never appear here.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
PRIVACY = "privacy"
REFUSAL = "refusal"  # a site's reply when it will not train the round: {"reason": ...}
INSTRUCTIONS = "instructions"
NUM_EXAMPLES = "num-examples"


@dataclass
class RoundInstructions:
    """One round's orders for one hospital.

    Attributes:
        round: this round (1-based); rounds: total rounds of the federation (DP calibration).
        seed: the scenario seed (with the hospital name and round it seeds the local RNG).
        hospital: name, dataset, size and partition fields of the scenario's ClientSpec.
        model: ``{"preset": ..., "overrides": {...}}``.
        pretext: task -> weight; mask_ratio: for ``mae``.
        training: LocalTrainSpec fields.
        privacy: PrivacySpec fields, or None (no DP-SGD).
        privacy_state: the accountant state the server last saw from this hospital (resume).
        data_dir: where the server expects the data (simulation); a site's node_config wins.
    """

    round: int
    rounds: int
    seed: int
    hospital: dict[str, Any]
    model: dict[str, Any]
    pretext: dict[str, float]
    mask_ratio: float
    training: dict[str, Any]
    privacy: dict[str, Any] | None = None
    privacy_state: str | None = None
    data_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RoundInstructions":
        return cls(**json.loads(text))
