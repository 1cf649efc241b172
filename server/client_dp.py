"""Client-level differential privacy for keyed aggregation (DP-FedAvg with server-side fixed clipping).

Flower's ``DifferentialPrivacyServerSideFixedClipping`` clips each reply against the global model by
zipping arrays positionally, which assumes every reply holds every global key. Our hospitals hold
different subsets of the model, so :class:`ClientLevelDP` does the same steps key by key,
inside the aggregation (``server.rounds.Aggregator``) rather than as a wrapper around the strategy:

1. **Clipping** (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models",
   arXiv:1710.06963): each hospital's update ``Delta_i = reply_i - sent_i`` is taken over the keys
   that hospital was sent and returned, and scaled to L2 norm at most ``clipping_norm`` (FlatClip).
2. **Noise**: each key is averaged over the ``n_k`` valid updates that hold it, with
   equal weights (example-weighted means would let one large hospital move the average by more than
   ``C / n``). Removing one hospital changes the SUM of key ``k`` by at most its clipped update, so the
   sum of all keys has L2 sensitivity ``C``; Gaussian noise ``N(0, (sigma C)^2)`` on that sum is noise of
   std ``sigma * C / n_k`` on key ``k``'s mean. For keys every sampled hospital holds (``body.*``) this
   is Flower's ``noise_multiplier * clipping_norm / num_sampled_clients``; keys held by fewer
   hospitals (a dataset's latents) get proportionally more, which the guarantee needs. As in Flower,
   ``n_k`` is the number of updates received; under add/remove-one adjacency a fixed denominator
   (McMahan et al.'s fixed-denominator estimator) would be exact, under replace-one this is.
3. **Order**: the noise goes on the average, before the server optimizer (FedAvgM, FedAdam), whose
   state then only ever holds noised values: everything after the noise is post-processing.
4. **Secret noise**: the Gaussian noise comes from a generator seeded afresh every round from the
   server's ``os.urandom`` (``medformer.seeding.secret_numpy_rng``), never from the scenario seed the
   hospitals know: a hospital that could regenerate the noise could subtract it and read the clean
   aggregate. A resumed run therefore adds different noise than the interrupted one would have.

Accounting: one Gaussian release per round with noise multiplier ``sigma``, composed over rounds with
Opacus's ``RDPAccountant`` (Mironov 2017) at sampling rate q = 1: no amplification by subsampling is
claimed. Hospitals are sampled as a fixed-size subset drawn from the public scenario seed, which is
not the secret Poisson sampling the amplified bound assumes; q = 1 is the honest bound whichever
hospitals a round samples (a hospital sampled every round is the worst case). The default delta is
:func:`default_client_delta`.

Why not Flower's own accountant (``flwr.serverapp.PrivacyAccountant`` / ``RdpAccountant``): its
wrapper accepts one only when the wrapped strategy uses ``FedAvg.aggregate_train`` unchanged (KeyedFedAvg
overrides it to aggregate key by key), with ``sampling_method='no-amplification'`` and equal client
weights in the reply metrics, and its RDP backend needs the optional ``dp-accounting`` package
(``flwr[dp]``), which this project does not install. Opacus's RDP accountant (already a dependency)
computes the same Gaussian-mechanism composition.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
from opacus.accountants import RDPAccountant

from medformer.seeding import secret_numpy_rng
from server.aggregation import Arrays, Update, clip_update, keyed_mean

log = logging.getLogger(__name__)


def default_client_delta(num_clients: int) -> float:
    """Client-level delta when the scenario sets none: 1e-5, or 1/(100 n) for n > 1,000 hospitals.

    Delta is the probability that the guarantee fails outright, so it must be far below 1/n (a delta
    of 1/n allows releasing one random hospital's update in the clear); 1e-5 is the usual choice for
    the consortium sizes this project sees.
    """
    return min(1e-5, 1.0 / (100 * max(1, num_clients)))


def client_level_epsilon(*, noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Client-level epsilon after ``rounds`` sampled Gaussian releases (Opacus RDP accountant)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = RDPAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(rounds))]
    return float(acc.get_epsilon(delta=delta))


def client_dp_summary(spec, *, clients: int, rounds: int) -> dict:
    """``summary.json["client_dp"]``: client-level epsilon after ``rounds`` releases (q = 1, see above).

    ``spec`` is the scenario's ``client_dp`` section (``config.ClientDPSpec``).
    """
    delta = spec.target_delta if spec.target_delta is not None else default_client_delta(clients)
    eps = client_level_epsilon(noise_multiplier=spec.noise_multiplier, sample_rate=1.0, rounds=rounds, delta=delta)
    return {"epsilon": eps if math.isfinite(eps) else None, "delta": delta, "noise_multiplier": spec.noise_multiplier,
            "clipping_norm": spec.clipping_norm, "sample_rate": 1.0, "rounds": rounds, "clients": clients,
            "accountant": "rdp", "mode": spec.mode}


class ClientLevelDP:
    """Clip each site's update to ``clipping_norm`` over its own keys, average them with equal
    weights, and add Gaussian noise of std ``noise_multiplier * clipping_norm / n_k`` to key k's mean.

    Args:
        noise_multiplier: sigma, noise std as a multiple of ``clipping_norm`` (on the sum of updates).
        clipping_norm: C, L2 bound of each site's update over all its keys.
        rng: the noise source; None (always, outside tests) = a fresh secret generator every round.

    Notes:
        The guarantee is client-level (a whole site's contribution), composes over rounds, and holds
        for every released global model provided no reply is averaged unclipped: replies that fail
        validation never reach :meth:`noised_mean`.
    """

    def __init__(self, *, noise_multiplier: float, clipping_norm: float, rng: np.random.Generator | None = None):
        if noise_multiplier < 0 or not clipping_norm > 0:
            raise ValueError(f"need noise_multiplier >= 0 and clipping_norm > 0, got {noise_multiplier} and "
                             f"{clipping_norm}")
        self.noise_multiplier, self.clipping_norm = noise_multiplier, clipping_norm
        self._rng = rng
        self.last_norms: dict[str, float] = {}      # site -> its update's L2 norm before clipping
        self.last_noise_std: dict[str, float] = {}  # key -> noise std added this round

    def noised_mean(self, sent: Mapping[str, Arrays], updates: list[Update]) -> dict[str, np.ndarray]:
        """The noised, equally weighted mean of the clipped updates, key by key."""
        self.last_norms, self.last_noise_std = {}, {}
        clipped = []
        for u in updates:
            arrays, norm = clip_update(sent[u.name], u.arrays, self.clipping_norm)
            self.last_norms[u.name] = norm
            # Equal weights: the sensitivity argument needs an unweighted mean.
            clipped.append(Update(u.name, arrays, 1))
        mean = keyed_mean(clipped)
        holders: dict[str, int] = {}
        for u in clipped:
            for k in u.arrays:
                holders[k] = holders.get(k, 0) + 1
        rng = self._rng if self._rng is not None else secret_numpy_rng()
        noised = {}
        for k, a in mean.items():  # keys nobody sent keep their value: no site's data touched them
            if np.issubdtype(a.dtype, np.floating):
                std = self.noise_multiplier * self.clipping_norm / holders[k]
                a = (a.astype(np.float64) + rng.normal(0.0, std, a.shape)).astype(a.dtype) if std > 0 else a
                self.last_noise_std[k] = std
            noised[k] = a
        log.info("client-level DP: %d updates clipped to %.3g (norms %s), noise std %.3g on shared keys",
                 len(self.last_norms), self.clipping_norm,
                 ", ".join(f"{n} {v:.3g}" for n, v in sorted(self.last_norms.items())),
                 self.noise_multiplier * self.clipping_norm / max(holders.values(), default=1))
        return noised
