"""A site's own privacy policy and its own accountant ledger: what no server instruction can override.

A hospital's SuperNode may set, in its ``--node-config``::

    max-epsilon=8.0      the most its records may ever spend (over every run recorded in state-dir)
    delta=1e-5           the delta its epsilon is accounted at (the server may only ask for less)
    max-grad-norm=1.0    the largest per-sample clipping norm it accepts (the server may ask for less)
    require-dp=true      refuse any round without DP-SGD (implied by max-epsilon)
    state-dir="/srv/medfl-state"   where its ledger lives, on its own disk

Whatever the server asks, :func:`settle_privacy` returns DP-SGD settings at least as private as the
policy (a larger epsilon, a larger delta or clip norm, or no DP at all are tightened, and the notes
say so), and :class:`LedgerStore` keeps every DP step the site took, per run, in a JSON file written
atomically with mode 0600. The site trusts no shorter history than its own: a server that "forgets"
steps cannot make the site overspend.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from medformer.dp.accounting import DPPlan, epsilon_of, history_steps, plan_dp

POLICY_KEYS = ("max-epsilon", "delta", "max-grad-norm", "require-dp", "state-dir")


class PolicyError(ValueError):
    """The node's privacy policy is malformed (the message names the node-config key)."""


@dataclass(frozen=True)
class SitePolicy:
    """The privacy floor a site sets for itself (see the module docstring for the node-config keys)."""

    max_epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float | None = None
    require_dp: bool = False
    state_dir: Path | None = None

    @property
    def demands_dp(self) -> bool:
        return self.require_dp or self.max_epsilon is not None

    @classmethod
    def from_node_config(cls, node_config: dict) -> "SitePolicy":
        """Read the policy keys of a node-config; a malformed value is a PolicyError naming its key."""
        def number(key: str, *, upper: float | None = None) -> float | None:
            if key not in node_config:
                return None
            v = node_config[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 \
                    or (upper is not None and v >= upper):
                bound = f" and < {upper:g}" if upper is not None else ""
                raise PolicyError(f"node-config {key}={v!r} must be a number > 0{bound}")
            return float(v)

        require = node_config.get("require-dp", False)
        if not isinstance(require, bool):
            raise PolicyError(f"node-config require-dp={require!r} must be true or false")
        state_dir = node_config.get("state-dir")
        if state_dir is not None:
            state_dir = Path(str(state_dir))
            if not state_dir.is_absolute():
                raise PolicyError(f"node-config state-dir={str(state_dir)!r} must be an absolute path")
        return cls(max_epsilon=number("max-epsilon"), delta=number("delta", upper=1.0),
                   max_grad_norm=number("max-grad-norm"), require_dp=require, state_dir=state_dir)


class PolicyRefusal(RuntimeError):
    """The site will not train this round; the message says why (it goes back in the reply)."""


def settle_privacy(requested: dict | None, policy: SitePolicy, *, num_examples: int, batch_size: int,
                   steps_per_round: int, rounds: int) -> tuple[DPPlan | None, list[str]]:
    """The DP-SGD plan this site trains with: the server's request tightened by the site's policy.

    Returns ``(plan, notes)``; ``plan`` is None only when neither side asks for DP. Raises
    PolicyRefusal when the policy demands DP but gives no budget and the server sent none.
    """
    notes: list[str] = []
    if not requested and not policy.demands_dp:
        return None, notes
    req = dict(requested or {})
    if not requested:
        if policy.max_epsilon is None:
            raise PolicyRefusal("this site requires DP-SGD (node-config require-dp) and the server asked for no "
                                "DP; set max-epsilon at the site or privacy in the scenario")
        notes.append(f"server asked for no DP; site trains at its max-epsilon {policy.max_epsilon:g}")
        req = {"target_epsilon": policy.max_epsilon}
    delta = req.get("target_delta")
    if policy.delta is not None and (delta is None or delta > policy.delta):
        if delta is not None:
            notes.append(f"delta {delta:g} asked, site's {policy.delta:g} used")
        delta = policy.delta
    clip = float(req.get("max_grad_norm") or 1.0)
    if policy.max_grad_norm is not None and clip > policy.max_grad_norm:
        notes.append(f"max-grad-norm {clip:g} asked, site's {policy.max_grad_norm:g} used")
        clip = policy.max_grad_norm
    common = dict(num_examples=num_examples, batch_size=batch_size, steps_per_round=steps_per_round, rounds=rounds,
                  delta=delta, max_grad_norm=clip, accountant=req.get("accountant") or "rdp")
    target, sigma = req.get("target_epsilon"), req.get("noise_multiplier")
    if policy.max_epsilon is not None and target is not None and target > policy.max_epsilon:
        notes.append(f"epsilon {target:g} asked, site's max-epsilon {policy.max_epsilon:g} used")
        target = policy.max_epsilon
    plan = plan_dp(target_epsilon=target, noise_multiplier=None if target is not None else sigma, **common)
    if policy.max_epsilon is not None and target is None:
        planned = epsilon_of([(plan.noise_multiplier, plan.sample_rate, plan.total_steps)], delta=plan.delta,
                             accountant=plan.accountant)
        if planned > policy.max_epsilon:
            notes.append(f"noise multiplier {sigma:g} would spend epsilon {planned:.3g}; site recalibrated to its "
                         f"max-epsilon {policy.max_epsilon:g}")
            plan = plan_dp(target_epsilon=policy.max_epsilon, **common)
    return plan, notes


class LedgerStore:
    """A site's accountant histories on its own disk: ``<state-dir>/privacy-ledger-<site>.json``.

    ``{"site": name, "runs": {"<run id>": {"history": [[sigma, q, steps], ...], "delta": d,
    "accountant": "rdp"}}}``. Written to a temporary file (mode 0600, O_EXCL) in the same folder,
    fsynced and renamed, so a crash leaves the previous ledger intact.
    """

    def __init__(self, state_dir: Path, site: str):
        self.path = Path(state_dir) / f"privacy-ledger-{site}.json"
        self.site = site

    def _read(self) -> dict:
        if not self.path.exists():
            return {"site": self.site, "runs": {}}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            # A damaged ledger must stop the site, not reset its spend to zero.
            raise PolicyRefusal(f"the site's privacy ledger {self.path} is unreadable ({e}); refusing to train "
                                "until it is restored") from None
        return data

    def history(self, run_id: int | str) -> list[list[float]] | None:
        """This run's history, or None when the ledger has no entry for it."""
        entry = self._read()["runs"].get(str(run_id))
        return entry["history"] if entry else None

    def other_runs(self, run_id: int | str) -> list[list[float]]:
        """Every DP step of the site's other runs: they spend the same records' budget."""
        return [h for rid, e in self._read()["runs"].items() if rid != str(run_id) for h in e["history"]]

    def save(self, run_id: int | str, history: list, *, delta: float, accountant: str) -> None:
        data = self._read()
        data["runs"][str(run_id)] = {"history": [list(h) for h in history], "delta": delta, "accountant": accountant}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)  # O_EXCL, mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def trusted_history(*candidates: str | None) -> str | None:
    """Of several copies of one run's history (the site's disk, its memory, the server's copy), the
    longest: copies only differ by steps one of them has not seen, so the longest is never an
    under-count. The site's own copies are always among the candidates."""
    best = None
    for c in candidates:
        if c is not None and history_steps(c) > history_steps(best):
            best = c
    return best
