"""Keyed aggregation maths and the KeyedFedAvg strategy's scoping, without running Flower."""
from __future__ import annotations

import typing

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from config import ModelSpec, Site, TrainingSpec
from medformer.model import make_config
from medformer.pretext import PretextObjective, build_pretext_model
from protocol import ARRAYS, METRICS, RoundInstructions
from config import scenario_from_dict
from config.schema import Weighting
from server.aggregation import WEIGHTINGS, ServerOptimizer, Update, keyed_mean, keyed_median, keyed_trimmed_mean
from server.strategy import KeyedFedAvg, RoundFailed, make_aggregator

BASE_SCENARIO = {"name": "t", "pretext": {"mae": 1.0},
                 "hospitals": [{"name": "breast", "dataset": "breastmnist"}]}

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def test_keyed_mean_equals_hand_computed_weighted_mean():
    rng = np.random.default_rng(0)
    shared_a, shared_b = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    only_a, only_b = rng.normal(size=5).astype(np.float32), rng.normal(size=2).astype(np.float32)
    a = Update("a", {"body.w": shared_a, "latents.x.tokens": only_a}, num_examples=30)
    b = Update("b", {"body.w": shared_b, "latents.y.tokens": only_b}, num_examples=10)
    out = keyed_mean([a, b])
    np.testing.assert_allclose(out["body.w"], (30 * shared_a + 10 * shared_b) / 40, rtol=1e-6)
    np.testing.assert_array_equal(out["latents.x.tokens"], only_a)  # held by a alone: a's value
    np.testing.assert_array_equal(out["latents.y.tokens"], only_b)
    assert out["body.w"].dtype == np.float32


def test_site_weightings_of_the_mean():
    a = Update("a", {"w": np.full(2, 1.0, np.float32)}, num_examples=900)
    b = Update("b", {"w": np.full(2, 0.0, np.float32)}, num_examples=100)
    assert keyed_mean([a, b])["w"][0] == pytest.approx(0.9)
    assert keyed_mean([a, b], "sqrt-examples")["w"][0] == pytest.approx(30 / 40)
    assert keyed_mean([a, b], "uniform")["w"][0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown weighting 'equal'; choose from examples, sqrt-examples, uniform"):
        keyed_mean([a, b], "equal")
    scenario_weightings = typing.get_args(Weighting)
    assert scenario_weightings == WEIGHTINGS  # the scenario offers exactly what the aggregator does
    sc = scenario_from_dict({**BASE_SCENARIO, "strategy": {"name": "fedavgm", "weighting": "uniform"}})
    assert make_aggregator(sc).weighting == "uniform"


def test_median_and_trimmed_mean_resist_one_outlier():
    ups = [Update(str(i), {"w": np.full(3, v, np.float32)}, 10) for i, v in enumerate([1.0, 1.1, 0.9, 1.05, 1e6])]
    assert np.allclose(keyed_median(ups)["w"], 1.05)
    assert np.allclose(keyed_trimmed_mean(ups, 0.2)["w"], np.mean([1.0, 1.1, 1.05]))
    assert keyed_mean(ups)["w"][0] > 1e5


def test_server_optimizers_move_only_aggregated_keys():
    cur = {"a": np.zeros(2, np.float32), "b": np.ones(2, np.float32)}
    agg = {"a": np.full(2, 1.0, np.float32)}
    assert np.allclose(ServerOptimizer("fedavg").apply(cur, agg)["a"], 1.0)
    m = ServerOptimizer("fedavgm", lr=1.0, momentum=0.5)
    first = m.apply(cur, agg)
    second = m.apply(first, {"a": first["a"] + 1.0})
    assert np.allclose(second["a"], 1.0 + (0.5 * 1.0 + 1.0))
    adam = ServerOptimizer("fedadam", lr=0.1).apply(cur, agg)
    assert np.allclose(adam["a"], 0.1 * 0.1 / (np.sqrt(0.01) + 1e-3), rtol=1e-5)
    for out in (first, second, adam):
        np.testing.assert_array_equal(out["b"], cur["b"])


# ---- strategy: scoping of what each hospital receives and sends -------------------------------------
class _FakeGrid:
    def __init__(self, node_ids):
        self._ids = node_ids

    def get_node_ids(self):
        return list(self._ids)


def _five_hospital_sites():
    cfg = make_config("tiny")
    obj = PretextObjective({"mae": 1.0, "rotation": 0.5})
    datasets = [("breastmnist", 28), ("pneumoniamnist", 28), ("retinamnist", 28), ("adrenalmnist3d", 28),
                ("vesselmnist3d", 28)]
    global_state = build_pretext_model(cfg, datasets, obj).state_dict()
    sites: dict[int, Site] = {}
    for i, (flag, size) in enumerate(datasets):
        KEYS[100 + i] = list(build_pretext_model(cfg, [(flag, size)], obj).state_dict())
        name = flag.removesuffix("3d").removesuffix("mnist")
        sites[100 + i] = Site(name, flag, size, num_examples=100 * (i + 1))
    arrays = ArrayRecord(array_dict={k: Array(v.numpy()) for k, v in global_state.items()})
    return sites, arrays


KEYS: dict[int, list[str]] = {}  # node id -> the keys its site holds (filled by _five_hospital_sites)


def _instructions(site, rnd):
    return RoundInstructions(round=rnd, seed=0, site=site, model=ModelSpec(), pretext={}, mask_ratio=0.75,
                             training=TrainingSpec())


def _reply(msg: Message, arrays: dict, n: int) -> Message:
    record = ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})
    return Message(content=RecordDict({ARRAYS: record, METRICS: MetricRecord({"num-examples": n})}), reply_to=msg)



def test_five_hospitals_scope_and_body_average():
    sites, arrays = _five_hospital_sites()
    strategy = KeyedFedAvg(sites=sites, keys=KEYS, instructions=_instructions)
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), _FakeGrid(sites)))
    assert len(msgs) == 5
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    breast = set(by_node[100].content[ARRAYS].keys())
    adrenal = set(by_node[103].content[ARRAYS].keys())
    assert not any(k.startswith("inputs.3d-1ch") for k in breast), "a 2D hospital must not receive 3D keys"
    assert any(k.startswith("inputs.3d-1ch") for k in adrenal)
    assert not any(k.startswith("latents.pneumoniamnist") for k in breast)
    # Every hospital adds (i+1) to every value it holds; body keys must average over all five.
    replies = []
    for node_id, msg in by_node.items():
        sent = {k: v.numpy() for k, v in msg.content[ARRAYS].items()}
        bump = float(node_id - 99)
        replies.append(_reply(msg, {k: v + bump for k, v in sent.items()}, sites[node_id].num_examples))
    new, metrics = strategy.aggregate_train(1, replies)
    weights = {nid: s.num_examples for nid, s in sites.items()}
    body_key = next(k for k in new.keys() if k.startswith("body."))
    expected_bump = sum(w * (nid - 99) for nid, w in weights.items()) / sum(weights.values())
    np.testing.assert_allclose(new[body_key].numpy() - arrays[body_key].numpy(), expected_bump, rtol=1e-5)
    tok3d = next(k for k in new.keys() if k.startswith("inputs.3d-1ch"))
    bump3d = (400 * 4 + 500 * 5) / 900  # adrenal and vessel only
    np.testing.assert_allclose(new[tok3d].numpy() - arrays[tok3d].numpy(), bump3d, rtol=1e-5)
    lat = "latents.breastmnist.tokens"
    np.testing.assert_allclose(new[lat].numpy() - arrays[lat].numpy(), 1.0, rtol=1e-5)
    assert metrics["num-examples"] == sum(weights.values())


def test_replies_outside_scope_or_broken_are_dropped_and_named():
    sites, arrays = _five_hospital_sites()
    strategy = KeyedFedAvg(sites=sites, keys=KEYS, instructions=_instructions, min_train_nodes=2)
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, arrays, ConfigRecord(), _FakeGrid(sites))}
    good = lambda nid: {k: v.numpy() for k, v in msgs[nid].content[ARRAYS].items()}  # noqa: E731
    stray = good(100)
    stray["inputs.3d-1ch.tokenizers.28.proj.bias"] = arrays["inputs.3d-1ch.tokenizers.28.proj.bias"].numpy()
    nan = good(101)
    nan[next(iter(nan))] = np.full_like(nan[next(iter(nan))], np.nan)
    replies = [_reply(msgs[100], stray, 100), _reply(msgs[101], nan, 200), _reply(msgs[102], good(102), 300),
               _reply(msgs[103], good(103), 400)]  # node 104 never answers
    strategy.aggregate_train(1, replies)
    dropped = strategy.report.dropped
    assert "outside its scope" in dropped["breast"]
    assert "non-finite" in dropped["pneumonia"]
    assert "timeout" in dropped["vessel"]
    assert set(strategy.report.trained) == {"retina", "adrenal"}
    with pytest.raises(RoundFailed):
        KeyedFedAvg(sites=sites, keys=KEYS, instructions=_instructions, min_train_nodes=3).aggregate_train(1, [])


def test_sampling_is_deterministic_and_respects_fraction():
    sites, _ = _five_hospital_sites()
    s = KeyedFedAvg(sites=sites, keys=KEYS, instructions=_instructions, fraction_train=0.4, min_train_nodes=1, seed=7)
    a, b = s.sample(3, sites), s.sample(3, sites)
    assert a == b and len(a) == 2 and all(isinstance(n, int) for n in a)
    assert any(s.sample(r, sites) != a for r in range(4, 12))
