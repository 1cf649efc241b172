"""Client-level DP on the server (server/client_dp.py): clipping bounds each hospital's update over its
own keys, the noise std is sigma * C / (hospitals holding the key), and epsilon matches Opacus."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from medformer.model import make_config
from medformer.pretext import PretextObjective, build_pretext_model
from config import ModelSpec, ScenarioError, Site, TrainingSpec, load_scenario
from protocol import ARRAYS, METRICS, RoundInstructions
from server.client_dp import ClientLevelDP, clip_update, client_level_epsilon
from server.rounds import Aggregator
from server.strategy import KeyedFedAvg

pytestmark = pytest.mark.usefixtures("flower_task_identity")

QUICKSTART = "simulations/configs/quickstart.yaml"


class _FakeGrid:
    def __init__(self, node_ids):
        self._ids = node_ids

    def get_node_ids(self):
        return list(self._ids)



def _sites():
    """Three 2D hospitals and one 3D one: body keys shared by 4, 2D input keys by 3, latents by 1."""
    cfg, obj = make_config("tiny"), PretextObjective({"mae": 1.0, "rotation": 0.5})
    torch.manual_seed(0)  # the same global model on every call: rounds are compared with each other
    datasets = [("breastmnist", 28), ("pneumoniamnist", 28), ("retinamnist", 28), ("adrenalmnist3d", 28)]
    arrays = build_pretext_model(cfg, datasets, obj).state_dict()
    sites, keys = {}, {}
    for i, (flag, size) in enumerate(datasets):
        keys[10 + i] = list(build_pretext_model(cfg, [(flag, size)], obj).state_dict())
        sites[10 + i] = Site(flag, flag, size, num_examples=100 * (i + 1))
    return sites, keys, ArrayRecord(array_dict={k: Array(v.numpy()) for k, v in arrays.items()})


def _instructions(site, rnd):
    return RoundInstructions(round=rnd, seed=0, site=site, model=ModelSpec(), pretext={}, mask_ratio=0.75,
                             training=TrainingSpec())


def _strategy(sites, keys, *, sigma: float, clip: float, rng=None, **aggregation) -> KeyedFedAvg:
    """KeyedFedAvg with client-level DP (what the federation builds for a client_dp scenario)."""
    cdp = ClientLevelDP(noise_multiplier=sigma, clipping_norm=clip, rng=rng)
    return KeyedFedAvg(sites=sites, keys=keys, instructions=_instructions,
                       aggregator=Aggregator(client_dp=cdp, **aggregation))


def _round(sigma: float, clip: float, scale: float, seed: int | None = 0):
    """One round where each hospital returns sent + scale * (its own random direction). ``seed``
    seeds the server's noise (tests only); None = a secret generator, as the federation uses."""
    sites, keys, arrays = _sites()
    dp = _strategy(sites, keys, sigma=sigma, clip=clip, rng=np.random.default_rng(seed) if seed is not None else None)
    msgs = {m.metadata.dst_node_id: m for m in dp.configure_train(1, arrays, ConfigRecord(), _FakeGrid(sites))}
    rng = np.random.default_rng(1)
    replies, updates = [], {}
    for nid, msg in msgs.items():
        sent = {k: v.numpy() for k, v in msg.content[ARRAYS].items()}
        upd = {k: (scale * rng.normal(size=v.shape)).astype(v.dtype) for k, v in sent.items()}
        updates[nid] = upd
        record = ArrayRecord(array_dict={k: Array(sent[k] + upd[k]) for k in sent})
        metrics = MetricRecord({"num-examples": sites[nid].num_examples, "loss": float(nid)})
        replies.append(Message(content=RecordDict({ARRAYS: record, METRICS: metrics}), reply_to=msg))
    new, metrics = dp.aggregate_train(1, replies)
    return sites, arrays, updates, dp, new, metrics


def test_clip_update_bounds_the_norm_over_the_replys_own_keys():
    rng = np.random.default_rng(0)
    sent = {"body.w": rng.normal(size=(4, 4)).astype(np.float32), "latents.a": rng.normal(size=3).astype(np.float32),
            "inputs.3d.w": rng.normal(size=5).astype(np.float32)}  # a key this reply does not hold
    reply = {"body.w": sent["body.w"] + 3.0, "latents.a": sent["latents.a"] - 4.0}
    clipped, norm = clip_update(sent, reply, 1.5)
    assert set(clipped) == {"body.w", "latents.a"}
    assert norm == pytest.approx(math.sqrt(16 * 9 + 3 * 16), rel=1e-6)
    after = math.sqrt(sum(float(np.sum((clipped[k].astype(np.float64) - sent[k]) ** 2)) for k in clipped))
    assert after == pytest.approx(1.5, rel=1e-5)
    # direction kept: the clipped update is a positive multiple of the original one
    np.testing.assert_allclose((clipped["body.w"] - sent["body.w"]) / (reply["body.w"] - sent["body.w"]),
                               1.5 / norm, rtol=1e-4)
    small = {"body.w": sent["body.w"] + 1e-3}
    same, _ = clip_update(sent, small, 1.5)
    np.testing.assert_array_equal(same["body.w"], small["body.w"])  # under the bound: untouched


def test_aggregate_of_clipped_updates_is_their_unweighted_keyed_mean_without_noise():
    clip = 0.7
    sites, arrays, updates, dp, new, metrics = _round(sigma=0.0, clip=clip, scale=0.05)
    assert set(dp.client_dp.last_norms) == {s.name for s in sites.values()}
    assert all(n > clip for n in dp.client_dp.last_norms.values())  # every update was really clipped
    clipped = {nid: {k: u * (clip / dp.client_dp.last_norms[sites[nid].name]) for k, u in upd.items()}
               for nid, upd in updates.items()}
    for key in ("body.blocks.0.attn.qkv.weight", "latents.breastmnist.tokens"):
        holders = [nid for nid in sites if key in dp.keys[nid]]
        expected = arrays[key].numpy() + np.mean([clipped[nid][key] for nid in holders], axis=0)  # equal weights
        np.testing.assert_allclose(new[key].numpy(), expected, rtol=1e-5, atol=1e-6)
    # each aggregated update's norm is at most C, so the mean moved body keys by at most C
    assert dp.report.trained["breastmnist"]["num-examples"] == 100  # the round's record keeps true counts
    assert metrics["num-examples"] == sum(s.num_examples for s in sites.values())


def test_noise_std_is_sigma_c_over_the_number_of_holders():
    sigma, clip = 2.0, 0.5
    _, _, _, dp0, clean, _ = _round(sigma=0.0, clip=clip, scale=0.05)
    sites, _, _, dp, noisy, _ = _round(sigma=sigma, clip=clip, scale=0.05, seed=3)
    body = [k for k in noisy.keys() if k.startswith("body.")]
    latent = "latents.retinamnist.tokens"  # held by one hospital
    tok2d = [k for k in noisy.keys() if k.startswith("inputs.2d-1ch")]  # breast and pneumonia (retina is 3-channel)
    assert dp.client_dp.last_noise_std[body[0]] == pytest.approx(sigma * clip / 4)
    assert dp.client_dp.last_noise_std[latent] == pytest.approx(sigma * clip / 1)
    assert dp.client_dp.last_noise_std[tok2d[0]] == pytest.approx(sigma * clip / 2)
    resid = np.concatenate([(noisy[k].numpy() - clean[k].numpy()).ravel() for k in body])
    assert resid.size > 5000
    assert resid.std() == pytest.approx(sigma * clip / 4, rel=0.05)
    assert abs(resid.mean()) < 0.05 * sigma * clip / 4
    lat = noisy[latent].numpy() - clean[latent].numpy()
    assert 0.2 * sigma * clip < lat.std() < 3 * sigma * clip


def test_client_level_noise_is_secret_and_cannot_be_subtracted():
    """The hospitals know the scenario seed (0) and the round (1): generators derived from them do
    not reproduce the server's noise, and two runs of the same round add different noise."""
    sigma, clip = 2.0, 0.5
    _, _, _, _, clean, _ = _round(sigma=0.0, clip=clip, scale=0.05)
    _, _, _, dp, first, _ = _round(sigma=sigma, clip=clip, scale=0.05, seed=None)
    _, _, _, _, second, _ = _round(sigma=sigma, clip=clip, scale=0.05, seed=None)
    body = [k for k in first.keys() if k.startswith("body.")]
    std = sigma * clip / 4
    assert not np.array_equal(first[body[0]].numpy(), second[body[0]].numpy())
    for guess in ([0, 1, 0xC11D], [0, 1], 0, 1):  # what the old code did, and other seeds a hospital knows
        rng = np.random.default_rng(guess)
        resid = np.concatenate([(first[k].numpy().astype(np.float64) - clean[k].numpy()
                                 - rng.normal(0.0, dp.client_dp.last_noise_std[k], first[k].shape)).ravel() for k in body])
        assert resid.std() > 1.2 * std  # the guess adds noise instead of removing it (sqrt(2) x std)


def test_invalid_reply_is_refused_not_clipped_into_the_average():
    sites, keys, arrays = _sites()
    dp = _strategy(sites, keys, sigma=0.0, clip=1.0)
    msgs = {m.metadata.dst_node_id: m for m in dp.configure_train(1, arrays, ConfigRecord(), _FakeGrid(sites))}
    replies = []
    for nid, msg in msgs.items():
        sent = {k: v.numpy() for k, v in msg.content[ARRAYS].items()}
        n = 0 if nid == 10 else sites[nid].num_examples  # breast: implausible count, must stay refused
        record = ArrayRecord(array_dict={k: Array(v) for k, v in sent.items()})
        replies.append(Message(content=RecordDict({ARRAYS: record, METRICS: MetricRecord({"num-examples": n})}),
                               reply_to=msg))
    dp.aggregate_train(1, replies)
    assert "implausible" in dp.report.dropped["breastmnist"]
    assert set(dp.report.trained) == {"pneumoniamnist", "retinamnist", "adrenalmnist3d"}


def test_median_is_refused_with_client_dp():
    sites, keys, _ = _sites()
    with pytest.raises(ValueError, match="mean aggregation"):
        _strategy(sites, keys, sigma=1.0, clip=1.0, rule="median")


@pytest.mark.parametrize("sigma, q, rounds", [(1.0, 1.0, 3), (0.8, 0.3, 50), (2.5, 0.1, 200)])
def test_client_level_epsilon_matches_an_independent_rdp_computation(sigma, q, rounds):
    delta = 1e-3
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus's default orders
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=rounds, orders=orders)
    expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    got = client_level_epsilon(noise_multiplier=sigma, sample_rate=q, rounds=rounds, delta=delta)
    assert got == pytest.approx(expected, rel=0.01)
    assert client_level_epsilon(noise_multiplier=sigma, sample_rate=q, rounds=2 * rounds, delta=delta) > got
    assert client_level_epsilon(noise_multiplier=0.0, sample_rate=q, rounds=1, delta=delta) == math.inf
    assert client_level_epsilon(noise_multiplier=sigma, sample_rate=q, rounds=0, delta=delta) == 0.0


def test_scenario_accepts_server_mode_and_refuses_client_mode_and_robust_rules():
    s = load_scenario(QUICKSTART, ["client_dp={noise_multiplier: 1.0, clipping_norm: 0.5}"])
    assert s.client_dp.mode == "server" and s.client_dp.target_delta is None
    with pytest.raises(ScenarioError, match=r"client_dp.mode: 'client' is not supported yet"):
        load_scenario(QUICKSTART, ["client_dp={noise_multiplier: 1.0, clipping_norm: 0.5, mode: client}"])
    with pytest.raises(ScenarioError, match="mean-based strategy"):
        load_scenario(QUICKSTART, ["client_dp={noise_multiplier: 1.0, clipping_norm: 0.5}", "strategy.name=median"])


def test_noise_goes_on_the_average_before_the_server_optimizer():
    """FedAvgM with server lr 0.5: the step is 0.5 x (noised average - current), so the noise std halves."""
    from server.aggregation import ServerOptimizer

    sites, keys, arrays = _sites()

    def one_round(sigma, opt):
        dp = _strategy(sites, keys, sigma=sigma, clip=1.0, server_optimizer=opt)
        msgs = list(dp.configure_train(1, arrays, ConfigRecord(), _FakeGrid(sites)))
        replies = [Message(content=RecordDict({ARRAYS: m.content[ARRAYS], METRICS: MetricRecord({"num-examples": 5})}),
                           reply_to=m) for m in msgs]  # every update is zero
        new, _ = dp.aggregate_train(1, replies)
        assert dp.server_optimizer is opt  # the real optimizer is back in place
        return new

    new = one_round(4.0, ServerOptimizer("fedavgm", lr=0.5, momentum=0.9))
    body = np.concatenate([(new[k].numpy() - arrays[k].numpy()).ravel() for k in new.keys() if k.startswith("body.")])
    assert body.std() == pytest.approx(0.5 * 4.0 * 1.0 / 4, rel=0.05)
