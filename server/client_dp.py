"""Client-level differential privacy for keyed aggregation (DP-FedAvg with server-side fixed clipping).

Flower's ``DifferentialPrivacyServerSideFixedClipping`` clips each reply against the global model by
zipping arrays positionally, which assumes every reply holds every global key. Our hospitals hold
different subsets of the model (``server.strategy.KeyedFedAvg``), so :class:`KeyedServerSideFixedClipping`
keeps Flower's wrapper (its constructor checks, ``summary`` and evaluation pass-through) and replaces
the two places that assumed one shared key set:

1. **Clipping** (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models",
   arXiv:1710.06963): each hospital's update ``Delta_i = reply_i - sent_i`` is taken over the keys
   that hospital was sent and returned, and scaled to L2 norm at most ``clipping_norm`` (FlatClip).
2. **Noise**: the inner strategy averages each key over the ``n_k`` valid updates that hold it, with
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

Why not Flower's own accountant (``flwr.serverapp.PrivacyAccountant`` / ``RdpAccountant``): the wrapper
accepts one only when the wrapped strategy uses ``FedAvg.aggregate_train`` unchanged (KeyedFedAvg
overrides it to aggregate key by key), with ``sampling_method='no-amplification'`` and equal client
weights in the reply metrics, and its RDP backend needs the optional ``dp-accounting`` package
(``flwr[dp]``), which this project does not install. Opacus's RDP accountant (already a dependency)
computes the same Gaussian-mechanism composition.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from opacus.accountants import RDPAccountant

from medformer.seeding import secret_numpy_rng
from medformer.wire import ARRAYS, METRICS, NUM_EXAMPLES
from server.aggregation import ServerOptimizer, clip_update
from server.strategy import KeyedFedAvg, _weighted_metrics

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


class KeyedServerSideFixedClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP wrapper, made correct for keyed aggregation.

    Args:
        strategy: the keyed strategy to wrap; its rule must be the (unweighted here) mean.
        noise_multiplier: sigma, noise std as a multiple of ``clipping_norm`` (on the sum of updates).
        clipping_norm: C, L2 bound of each hospital's update over all its keys.
        num_sampled_clients: hospitals sampled per round (for Flower's checks and its log line).
        rng: the noise source; None (always, outside tests) = a fresh secret generator every round.

    Notes:
        The guarantee is client-level (a whole hospital's contribution), composes over rounds, and
        holds for every released global model, provided replies are not aggregated unclipped: any
        reply that fails the inner strategy's checks (error, missing arrays, foreign keys, wrong shapes,
        non-finite values, budget exhausted) is left untouched here and refused there.
    """

    def __init__(self, strategy: KeyedFedAvg, *, noise_multiplier: float, clipping_norm: float,
                 num_sampled_clients: int, rng: np.random.Generator | None = None):
        if strategy.rule != "mean":
            raise ValueError(f"client-level DP needs the mean aggregation rule, not {strategy.rule!r}: the noise is "
                             "calibrated to the sensitivity of an average of clipped updates")
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self.strategy: KeyedFedAvg = strategy
        self._rng = rng
        self.last_norms: dict[str, float] = {}      # hospital -> its update's L2 norm before clipping
        self.last_noise_std: dict[str, float] = {}  # key -> noise std added this round

    def __repr__(self) -> str:
        return "KeyedServerSideFixedClipping(Differential Privacy, server-side fixed clipping, keyed)"

    # The federation reads these off its strategy, wrapped or not.
    @property
    def report(self):
        return self.strategy.report

    @property
    def server_optimizer(self):
        return self.strategy.server_optimizer

    @property
    def sites(self):
        return self.strategy.sites

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current_arrays = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent_by_node = self.strategy._sent
        self.last_norms, self.last_noise_std = {}, {}
        true_examples: dict[str, float] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            sent = sent_by_node.get(node)
            if sent is None:
                continue  # not sampled this round: the inner strategy ignores it
            site = self.strategy.sites[node]
            if self.strategy._check_reply(site, msg)[0] is None:
                continue  # refused as it stands (error, foreign keys, bad shapes...): the strategy names why
            record = msg.content.array_records[ARRAYS]
            clipped, norm = clip_update({k: sent[k].numpy() for k in record.keys()},
                                        {k: v.numpy() for k, v in record.items()}, self.clipping_norm)
            msg.content[ARRAYS] = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v))
                                                          for k, v in clipped.items()})
            self.last_norms[site.name] = norm
            # Equal weights: the sensitivity argument above needs an unweighted mean.
            metrics = msg.content.metric_records[METRICS]
            true_examples[site.name] = metrics[NUM_EXAMPLES]
            metrics[NUM_EXAMPLES] = 1
        # Average with an identity server step, noise the average, then take the real server step: a
        # server optimizer with state (FedAvgM, FedAdam) must only ever see noised averages, or its
        # momentum would carry un-noised updates into later releases.
        server_optimizer = self.strategy.server_optimizer
        self.strategy.server_optimizer = ServerOptimizer("fedavg")
        try:
            new, _ = self.strategy.aggregate_train(server_round, replies)
        finally:
            self.strategy.server_optimizer = server_optimizer
        report = self.strategy.report
        for name, n in true_examples.items():  # the round's record keeps each site's true example count
            if name in report.trained:
                report.trained[name][NUM_EXAMPLES] = n
        if new is None:
            return None, None
        holders: dict[str, int] = {}
        for msg in replies:
            site = self.strategy.sites.get(msg.metadata.src_node_id)
            if site is not None and site.name in report.trained:
                for k in msg.content.array_records[ARRAYS].keys():
                    holders[k] = holders.get(k, 0) + 1
        rng = self._rng if self._rng is not None else secret_numpy_rng()
        noised = {}
        for k in holders:  # keys nobody sent keep their value: no hospital's data touched them
            a = new[k].numpy()
            if np.issubdtype(a.dtype, np.floating):
                std = self.noise_multiplier * self.clipping_norm / holders[k]
                a = (a.astype(np.float64) + rng.normal(0.0, std, a.shape)).astype(a.dtype) if std > 0 else a
                self.last_noise_std[k] = std
            noised[k] = a
        current = {k: v.numpy() for k, v in self.current_arrays.items()}
        stepped = server_optimizer.apply(current, noised)
        arrays = {k: Array(np.ascontiguousarray(stepped[k])) for k in current}
        log.info("round %d: client-level DP: %d updates clipped to %.3g (norms %s), noise std %.3g on shared keys",
                 server_round, len(self.last_norms), self.clipping_norm,
                 ", ".join(f"{n} {v:.3g}" for n, v in sorted(self.last_norms.items())),
                 self.noise_multiplier * self.clipping_norm / max(holders.values(), default=1))
        return ArrayRecord(array_dict=arrays), MetricRecord(_weighted_metrics(report.trained))
