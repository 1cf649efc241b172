"""Record-level differential privacy for a hospital's local training (DP-SGD, Opacus).

The privacy budget covers the WHOLE federation: noise is calibrated for every local step this
hospital will take over all rounds (rounds x steps per round, Poisson sampling at rate q), and the
accountant's history is carried from round to round (and through checkpoints), so the epsilon we
report is the composition of every step ever taken, not one round's.

Notes:
    The guarantee holds for losses that are sums of per-sample terms, Poisson-sampled batches, and
    an accountant history that is never reset. Re-creating the accountant every round (as Flower's
    Opacus example does) under-reports epsilon by roughly a factor sqrt(rounds).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}


def default_delta(n: int) -> float:
    """A delta well below 1/n for a hospital with n training records: 1/(10 n)."""
    return 1.0 / (10 * max(1, n))


def make_accountant(name: str) -> IAccountant:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; choose from {', '.join(ACCOUNTANTS)}")
    return ACCOUNTANTS[name]()


@dataclass(frozen=True)
class DPPlan:
    """What a hospital's DP-SGD will do over the whole federation.

    Attributes:
        noise_multiplier: std of the Gaussian noise as a multiple of max_grad_norm.
        max_grad_norm: per-sample gradient clipping norm (L2).
        sample_rate: Poisson sampling probability q = batch_size / n.
        delta: the delta epsilon is reported at.
        accountant: 'rdp' or 'prv'.
        steps_per_round: DP-SGD steps one round takes.
        total_steps: steps the noise was calibrated for (rounds x steps_per_round).
        target_epsilon: the budget, or None when the noise multiplier was given.
        num_examples: n, this hospital's training records.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    delta: float
    accountant: str
    steps_per_round: int
    total_steps: int
    target_epsilon: float | None
    num_examples: int

    def to_dict(self) -> dict:
        return asdict(self)


def plan_dp(*, num_examples: int, batch_size: int, steps_per_round: int, rounds: int,
            target_epsilon: float | None = None, noise_multiplier: float | None = None,
            delta: float | None = None, max_grad_norm: float = 1.0, accountant: str = "rdp") -> DPPlan:
    """Calibrate DP-SGD for a hospital over every round of the federation."""
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ValueError("give exactly one of target_epsilon and noise_multiplier")
    if num_examples <= 0 or batch_size <= 0 or steps_per_round <= 0 or rounds <= 0:
        raise ValueError("num_examples, batch_size, steps_per_round and rounds must be positive")
    if (noise_multiplier is not None and noise_multiplier < 0) or not max_grad_norm > 0:
        raise ValueError(f"noise_multiplier must be >= 0 and max_grad_norm > 0, got "
                         f"{noise_multiplier} and {max_grad_norm}")
    make_accountant(accountant)  # validates the name
    q = min(1.0, batch_size / num_examples)
    delta = default_delta(num_examples) if delta is None else delta
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    total = steps_per_round * rounds
    if noise_multiplier is None:
        noise_multiplier = get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=q, steps=total,
            accountant=accountant, epsilon_tolerance=0.01,
        )
    return DPPlan(float(noise_multiplier), float(max_grad_norm), q, delta, accountant, steps_per_round,
                  total, target_epsilon, num_examples)


def epsilon_of(history: list[tuple[float, float, int]], *, delta: float, accountant: str) -> float:
    """Epsilon of an accountant history [(noise_multiplier, sample_rate, steps), ...]."""
    if not history:
        return 0.0
    if any(float(sigma) == 0 and float(q) > 0 and int(steps) > 0 for sigma, q, steps in history):
        return math.inf  # a noiseless step releases exact gradients (and PRV would overflow)
    acc = make_accountant(accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


class PrivacyLedger:
    """The accountant of one hospital, persisted across rounds as a small JSON-able state.

    Args:
        plan: this run's DP-SGD plan (noise, rate, delta, per-run budget).
        state: the run's history so far, ``{"history": [[sigma, q, steps], ...]}``.
        prior: DP steps the same records took in other runs (a site's ledger on disk); they count
            against ``cap`` but not against the run's own budget.
        cap: the site's own lifetime budget (node-config ``max-epsilon``), or None.
    """

    def __init__(self, plan: DPPlan, state: dict | None = None, *, prior: list | None = None,
                 cap: float | None = None):
        self.plan = plan
        self.accountant = make_accountant(plan.accountant)
        if state:
            self.accountant.history = [tuple(h) for h in state["history"]]
        self.prior = [tuple(h) for h in prior or []]
        self.cap = cap

    @property
    def steps(self) -> int:
        return sum(int(s) for _, _, s in self.accountant.history)

    @property
    def history(self) -> list[tuple]:
        return list(self.accountant.history)

    def epsilon(self) -> float:
        """This run's epsilon at the plan's delta."""
        return epsilon_of(self.accountant.history, delta=self.plan.delta, accountant=self.plan.accountant)

    def lifetime_epsilon(self) -> float:
        """Epsilon of every step these records took (other runs included) at the plan's delta."""
        return epsilon_of(self.prior + self.accountant.history, delta=self.plan.delta, accountant=self.plan.accountant)

    def _next(self, extra_steps: int) -> tuple:
        return (self.plan.noise_multiplier, self.plan.sample_rate, extra_steps)

    def epsilon_after(self, extra_steps: int) -> float:
        """Epsilon if ``extra_steps`` more steps at the planned noise and rate were taken."""
        return epsilon_of(self.history + [self._next(extra_steps)], delta=self.plan.delta,
                          accountant=self.plan.accountant)

    def refusal(self, extra_steps: int) -> str | None:
        """Why ``extra_steps`` more steps cannot be paid for (the run's budget or the site's lifetime
        cap would be exceeded), or None when they can."""
        tol = 1 + 1e-9
        if self.plan.target_epsilon is not None:
            after = self.epsilon_after(extra_steps)
            if after > self.plan.target_epsilon * tol:
                return (f"privacy budget exhausted: {extra_steps} more steps would take this run's epsilon from "
                        f"{self.epsilon():.3g} to {after:.3g}, over its target {self.plan.target_epsilon:g}")
        if self.cap is not None:
            after = epsilon_of(self.prior + self.history + [self._next(extra_steps)], delta=self.plan.delta,
                               accountant=self.plan.accountant)
            if after > self.cap * tol:
                return (f"privacy budget exhausted: {extra_steps} more steps would take the site's lifetime epsilon "
                        f"to {after:.3g}, over its node-config max-epsilon {self.cap:g}")
        return None

    def can_afford(self, extra_steps: int) -> bool:
        """False when ``extra_steps`` more steps would exceed the run's budget or the site's cap."""
        return self.refusal(extra_steps) is None

    def record_step(self) -> None:
        self.accountant.step(noise_multiplier=self.plan.noise_multiplier, sample_rate=self.plan.sample_rate)

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.accountant.history]}

    def to_json(self) -> str:
        return json.dumps(self.state_dict())

    @classmethod
    def from_json(cls, plan: DPPlan, text: str | None, **kw) -> "PrivacyLedger":
        return cls(plan, json.loads(text) if text else None, **kw)


def history_steps(state_json: str | None) -> int:
    """DP steps recorded in an accountant state ``{"history": [[sigma, q, steps], ...]}`` (JSON); -1 for none."""
    return sum(int(h[2]) for h in json.loads(state_json)["history"]) if state_json else -1
