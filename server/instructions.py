"""A site's orders for a round: the scenario's recipe, its privacy request, its injected fault."""
from __future__ import annotations

from config import PrivacySpec, Scenario, Site
from protocol import RoundInstructions


class Instructor:
    """Builds each site's :class:`~protocol.RoundInstructions` from the scenario.

    Args:
        scenario: the federation's recipe.
        data_dir: where simulated sites find their data (a deployed site's node-config wins).
        privacy_states: site -> the accountant history the server last saw (kept current by the run).
        faults: send the scenario's injected faults (simulation only).
    """

    def __init__(self, scenario: Scenario, *, data_dir: str | None, privacy_states: dict[str, str],
                 faults: bool = True):
        self.scenario, self.data_dir, self.privacy_states, self.faults = scenario, data_dir, privacy_states, faults
        self._sites = {c.name: c for c in scenario.clients()}

    def privacy_of(self, site: Site) -> PrivacySpec | None:
        """DP-SGD request for a site: its scenario entry's own, else the scenario's (a deployed site the
        scenario does not list gets the scenario-wide setting; its own policy may tighten it)."""
        known = self._sites.get(site.name)
        return known.privacy if known is not None else self.scenario.privacy

    def __call__(self, site: Site, rnd: int) -> RoundInstructions:
        sc = self.scenario
        fault = next((f for f in sc.faults if f.hospital == site.name and (not f.rounds or rnd in f.rounds)), None)
        return RoundInstructions(
            round=rnd, seed=sc.seed, site=site, model=sc.model, pretext=dict(sc.pretext), mask_ratio=sc.mask_ratio,
            training=sc.training, proximal_mu=sc.strategy.proximal_mu if sc.strategy.name == "fedprox" else 0.0,
            threads=sc.simulation.threads_per_client, device=sc.device, privacy=self.privacy_of(site),
            privacy_state=self.privacy_states.get(site.name), data_dir=self.data_dir,
            fault=fault if self.faults else None,
        )
