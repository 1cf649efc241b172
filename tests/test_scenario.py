"""Scenario schema: shipped configs, one-line errors naming the field, --set overrides, client
expansion, data-file checks and train-split partitioning."""

from __future__ import annotations

import copy
import dataclasses
import types
import warnings
from pathlib import Path
from typing import Union, get_args, get_origin, get_type_hints

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synthetic import write_synthetic_npz
from medformer import data as mdata
from config import (
    PRETEXT_TASKS,
    Site,
    PrivacySpec,
    Scenario,
    ScenarioError,
    apply_overrides,
    check_data_files,
    load_scenario,
    scenario_from_dict,
)
from medformer.data import partition_indices
from medformer.model import make_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "simulations" / "configs").glob("*.yaml"))
REAL_DATA = ROOT.parent / "shared" / "data" / "medmnist"

BASE = {
    "name": "t",
    "hospitals": [
        {"name": "breast", "dataset": "breastmnist"},
        {"name": "adrenal", "dataset": "adrenalmnist3d", "size": 64},
    ],
}


def _with(path: str, value, base=BASE) -> dict:
    """Copy of ``base`` with ``value`` set at a dotted path (list items by index)."""
    d = copy.deepcopy(base)
    *head, last = [int(k) if k.isdigit() else k for k in path.split(".")]
    node = d
    for k in head:
        node = node[k] if isinstance(node, list) else node.setdefault(k, {})
    node[last] = value
    return d


def _error(d) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(d)
    return info.value


# ------------------------------------------------------------------------------- shipped configs


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "five-hospitals.yaml", "non-iid.yaml",
            "quickstart-dp.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_round_trips(path):
    s = load_scenario(path)
    assert s.name == path.stem
    assert scenario_from_dict(s.to_dict()) == s
    assert scenario_from_dict(yaml.safe_load(s.to_yaml())) == s
    assert s.clients() and s.datasets()


def test_quickstart_contents():
    s = load_scenario(ROOT / "simulations/configs/quickstart.yaml")
    assert [(c.name, c.dataset, c.size) for c in s.clients()] == [
        ("breast", "breastmnist", 28), ("pneumonia", "pneumoniamnist", 28),
        ("retina", "retinamnist", 28)]
    assert s.model.preset == "default" and s.pretext == {"mae": 1.0, "contrastive": 1.0}
    assert (s.training.rounds, s.training.local_epochs, s.training.batch_size) == (3, 1.0, 128)
    assert s.evaluation.eval_every == 0 and s.evaluation.linear_probe
    assert s.privacy is None and s.client_dp is None


def test_dp_config_applies_privacy_to_every_client():
    s = load_scenario(ROOT / "simulations/configs/quickstart-dp.yaml")
    assert s.privacy == PrivacySpec(target_epsilon=8.0, max_grad_norm=1.0, accountant="rdp")
    assert all(c.privacy == s.privacy for c in s.clients())


def test_non_iid_config_expands_into_ten_clients():
    s = load_scenario(ROOT / "simulations/configs/non-iid.yaml")
    clients = s.clients()
    assert [c.name for c in clients] == [f"pneumonia-{i}" for i in range(10)]
    assert [c.partition_index for c in clients] == list(range(10))
    assert {(c.partition_parts, c.partition_method, c.partition_alpha) for c in clients} == {
        (10, "dirichlet", 0.3)}
    assert s.datasets() == [("pneumoniamnist", 28)]


def test_five_hospitals_has_3d_sites():
    s = load_scenario(ROOT / "simulations/configs/five-hospitals.yaml")
    assert s.datasets()[-2:] == [("adrenalmnist3d", 28), ("vesselmnist3d", 28)]
    assert s.training.rounds == 5


def test_pretext_names_match_medformer():
    from medformer.pretext import TASKS

    assert set(PRETEXT_TASKS) == set(TASKS)


# ------------------------------------------------------------------------------- defaults, views


def test_defaults_and_views():
    s = scenario_from_dict(BASE)
    assert s.seed == 0 and s.mask_ratio == 0.75 and s.strategy.name == "fedavg"
    assert s.training.optimizer == "adamw" and s.training.local_steps is None
    assert s.hospitals[0].size == 28
    assert s.clients() == [Site("breast", "breastmnist", 28),
                           Site("adrenal", "adrenalmnist3d", 64)]


def test_ints_accepted_as_floats_and_yaml11_exponents():
    s = scenario_from_dict(_with("training.lr", "1e-3", _with("training.local_epochs", 2)))
    assert s.training.lr == 1e-3 and isinstance(s.training.local_epochs, float)


def test_hospital_privacy_overrides_scenario_privacy():
    d = _with("privacy", {"noise_multiplier": 1.0})
    d = _with("hospitals.1.privacy", {"target_epsilon": 3}, d)
    a, b = scenario_from_dict(d).clients()
    assert a.privacy == PrivacySpec(noise_multiplier=1.0)
    assert b.privacy == PrivacySpec(target_epsilon=3.0)


def test_datasets_are_unique_in_hospital_order():
    d = copy.deepcopy(BASE)
    d["hospitals"].append({"name": "b2", "dataset": "breastmnist",
                           "partition": {"parts": 2}})
    d["hospitals"].append({"name": "b3", "dataset": "breastmnist", "size": 64})
    with pytest.warns(UserWarning, match="'breast' and 'b3' both hold the whole train split"):
        s = scenario_from_dict(d)
    assert s.datasets() == [("breastmnist", 28), ("adrenalmnist3d", 64), ("breastmnist", 64)]
    iid = [c for c in s.clients() if c.name.startswith("b2-")]
    assert [(c.partition_method, c.partition_alpha) for c in iid] == [("iid", None)] * 2


def test_same_dataset_twice_warns():
    d = _with("hospitals.1", {"name": "again", "dataset": "breastmnist"})
    with pytest.warns(UserWarning, match="whole train split of breastmnist"):
        scenario_from_dict(d)


# ------------------------------------------------------------------------------- errors

ERROR_CASES = [
    # (id, dict, field path that must start the message, text the message must contain)
    ("unknown-top-key", _with("roundz", 3), "roundz", "unknown key"),
    ("unknown-nested-key", _with("training.roundz", 3), "training.roundz", "did you mean 'rounds'"),
    ("unknown-hospital-key", _with("hospitals.0.sise", 28), "hospitals[0].sise", "unknown key"),
    ("wrong-type", _with("training.rounds", "three"), "training.rounds",
     "expected an integer, got 'three'"),
    ("bool-as-int", _with("training.rounds", True), "training.rounds", "got true"),
    ("bool-as-float", _with("training.lr", False), "training.lr", "expected a number"),
    ("float-as-int", _with("training.batch_size", 12.5), "training.batch_size", "integer"),
    ("int-as-bool", _with("evaluation.linear_probe", 1), "evaluation.linear_probe", "boolean"),
    ("negative", _with("training.lr", -0.1), "training.lr", "> 0"),
    ("zero-rounds", _with("training.rounds", 0), "training.rounds", ">= 1"),
    ("absurd-rounds", _with("training.rounds", 10**9), "training.rounds", "<= 10000"),
    ("huge-int-float", _with("training.lr", 10**400), "training.lr", "finite"),
    ("nan", _with("mask_ratio", float("nan")), "mask_ratio", "finite"),
    ("mask-ratio-one", _with("mask_ratio", 1), "mask_ratio", "< 1"),
    ("negative-seed", _with("seed", -1), "seed", ">= 0"),
    ("bad-literal", _with("strategy.name", "fedavgg"), "strategy.name", "did you mean 'fedavg'"),
    ("bad-optimizer", _with("training.optimizer", "adam"), "training.optimizer", "'adamw', 'sgd'"),
    ("section-not-mapping", _with("training", [1, 2]), "training", "expected a mapping"),
    ("unknown-dataset", _with("hospitals.1.dataset", "breastmnst"), "hospitals[1].dataset",
     "unknown dataset 'breastmnst' (did you mean 'breastmnist'?); choose from "
     "adrenalmnist3d, bloodmnist, breastmnist"),
    ("bad-size", _with("hospitals.1.size", 128), "hospitals[1].size",
     "not available for adrenalmnist3d; choose from 28, 64"),
    ("duplicate-names", _with("hospitals.1.name", "breast"), "hospitals[1].name", "duplicate"),
    ("bad-hospital-name", _with("hospitals.0.name", "a b"), "hospitals[0].name", "bad hospital"),
    ("empty-hospitals", _with("hospitals", []), "hospitals", "at least one hospital"),
    ("missing-hospitals", {"name": "x"}, "hospitals", "missing required field"),
    ("missing-name", {"hospitals": BASE["hospitals"]}, "name", "missing required field"),
    ("hospitals-not-list", _with("hospitals", {"a": 1}), "hospitals", "expected a list"),
    ("missing-dataset", _with("hospitals.0", {"name": "x"}), "hospitals[0].dataset", "missing"),
    ("unknown-pretext", _with("pretext", {"mea": 1.0}), "pretext.mea", "did you mean 'mae'"),
    ("zero-weight", _with("pretext.rotation", 0), "pretext.rotation", "> 0"),
    ("no-pretext", _with("pretext", {}), "pretext", "at least one task"),
    ("bridge-alone", _with("pretext", {"bridge": 1.0}), "pretext.bridge", "needs another task"),
    ("fedprox-needs-mu", _with("strategy.name", "fedprox"), "strategy.proximal_mu", "> 0"),
    ("trim-fraction", _with("strategy.trim_fraction", 0.5), "strategy.trim_fraction", "< 0.5"),
    ("too-many-min-nodes", _with("strategy.min_train_nodes", 3), "strategy.min_train_nodes",
     "exceeds the 2 clients"),
    ("privacy-neither", _with("privacy", {"max_grad_norm": 1.0}), "privacy", "exactly one"),
    ("privacy-both", _with("privacy", {"target_epsilon": 1, "noise_multiplier": 1}),
     "privacy", "exactly one"),
    ("privacy-delta", _with("privacy", {"target_epsilon": 1, "target_delta": 1}),
     "privacy.target_delta", "< 1"),
    ("hospital-privacy-key", _with("hospitals.0.privacy", {"epsilon": 1}),
     "hospitals[0].privacy.epsilon", "unknown key"),
    ("client-dp-missing", _with("client_dp", {"mode": "client"}), "client_dp.noise_multiplier",
     "missing"),
    ("contrastive-with-dp", _with("privacy", {"target_epsilon": 8},
                                  _with("pretext.contrastive", 1.0)),
     "pretext.contrastive", "DP-SGD"),
    ("partition-one-part", _with("hospitals.0.partition", {"parts": 1}),
     "hospitals[0].partition.parts", ">= 2"),
    ("partition-too-many", _with("hospitals.0.partition", {"parts": 547}),
     "hospitals[0].partition.parts", "546 training examples"),
    ("partition-method", _with("hospitals.0.partition", {"parts": 2, "method": "Dirichlet"}),
     "hospitals[0].partition.method", "'iid', 'dirichlet'"),
    ("client-name-collision", _with("hospitals.1", {"name": "breast-0", "dataset": "bloodmnist"},
                                    _with("hospitals.0.partition", {"parts": 2})),
     "hospitals[1].name", "collides"),
    ("override-key", _with("model.overrides", {"not valid": 1}), "model.overrides['not valid']",
     "identifier"),
    ("override-value", _with("model.overrides", {"depth": "four"}), "model.overrides.depth",
     "expected an integer"),
    ("override-bool-field", _with("model.overrides", {"site_norms": 1}), "model.overrides.site_norms",
     "expected a boolean (true/false)"),
    ("override-unknown-field", _with("model.overrides", {"site_norm": True}), "model.overrides.site_norm",
     "did you mean 'site_norms'"),
    ("override-model-rule", _with("model.overrides", {"stem": "cnn"}), "model.overrides",
     "stem='cnn' must be one of patch, conv"),
    ("non-string-key", {**BASE, 3: 1}, "[3]", "unknown key"),
    ("top-level-list", [BASE], "scenario", "expected a mapping"),
]


@pytest.mark.parametrize("d, path, text", [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_error_is_one_line_naming_the_field(d, path, text):
    err = _error(d)
    message = str(err)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    assert text in message, message
    assert message.startswith(err.problems[0])


def test_all_problems_are_reported_at_once():
    d = _with("training.rounds", "x", _with("seed", -3, _with("hospitals.0.dataset", "nope")))
    err = _error(d)
    assert len(err.problems) == 3
    message = str(err)
    assert "\n" not in message
    assert message.startswith("seed: ") and "(and 2 more: " in message
    assert "training.rounds: expected an integer" in message
    assert "hospitals[0].dataset: unknown dataset 'nope'" in message


def test_scenario_error_is_a_value_error():
    assert issubclass(ScenarioError, ValueError)


# ------------------------------------------------------------------------------- files, --set


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text(text)
    return p


def test_yaml_syntax_error_names_the_file(tmp_path):
    p = _write(tmp_path, "name: x\ntraining:\n  rounds: [1,\n")
    with pytest.raises(ScenarioError, match=r"s\.yaml: invalid YAML at line \d+, column \d+"):
        load_scenario(p)


@pytest.mark.parametrize("text, what", [("", "an empty file"), ("- a\n- b\n", "['a', 'b']"),
                                        ("just text", "'just text'")])
def test_top_level_must_be_a_mapping(tmp_path, text, what):
    with pytest.raises(ScenarioError, match="expected a mapping") as info:
        load_scenario(_write(tmp_path, text))
    assert str(info.value).startswith(str(tmp_path / "s.yaml")) and what in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ScenarioError, match="cannot read scenario file"):
        load_scenario(tmp_path / "nope.yaml")


def test_model_overrides_take_every_kind_of_config_field():
    """Booleans and strings reach the model as typed (the schema once took numbers only)."""
    s = scenario_from_dict(_with("model.overrides", {"stem": "conv", "stem_3d_full_res": True, "mlp_ratio": 3}))
    assert s.model.overrides == {"stem": "conv", "stem_3d_full_res": True, "mlp_ratio": 3}
    cfg = make_config(s.model.preset, **s.model.overrides)
    assert cfg.stem == "conv" and cfg.stem_3d_full_res is True and cfg.mlp_ratio == 3


def test_set_overrides():
    s = load_scenario(CONFIGS[0].parent / "quickstart.yaml", [
        "training.rounds=2", "strategy.name=fedprox", "strategy.proximal_mu=0.01",
        "hospitals.0.size=64", "privacy.target_epsilon=4", "pretext={mae: 1}",
        "hospitals.2.partition.parts=3", "model.overrides.depth=2", "name=my run"])
    assert s.training.rounds == 2 and s.strategy.name == "fedprox"
    assert s.hospitals[0].size == 64 and s.privacy.target_epsilon == 4.0
    assert s.pretext == {"mae": 1.0} and s.model.overrides == {"depth": 2}
    assert [c.name for c in s.clients()][-3:] == ["retina-0", "retina-1", "retina-2"]
    assert s.name == "my run"
    s = load_scenario(CONFIGS[0].parent / "quickstart-dp.yaml", ["privacy=null"])
    assert s.privacy is None


def test_set_does_not_modify_its_input():
    d = copy.deepcopy(BASE)
    apply_overrides(d, ["training.rounds=7", "hospitals.0.size=64"])
    assert d == BASE


@pytest.mark.parametrize("item, text", [
    ("training.roundz=2", "--set training.roundz: unknown key 'roundz' in training"),
    ("trainin.rounds=2", "--set trainin.rounds: unknown key 'trainin' in scenario"),
    ("hospitals.5.size=64", "--set hospitals.5.size: index 5 out of range"),
    ("hospitals.x.size=64", "--set hospitals.x.size: hospitals is a list; expected an index"),
    ("seed.x=1", "--set seed.x: seed is a single value"),
    ("training=3", "training: expected a mapping"),  # path fine, value then fails validation
    ("rounds", "--set 'rounds': expected dotted.key=value"),
    ("=3", "--set '=3': expected dotted.key=value"),
    ("training.rounds=[1,", "--set training.rounds: value '[1,' is not valid YAML"),
    ("training.rounds=three", "training.rounds: expected an integer, got 'three'"),
])
def test_bad_set(item, text):
    with pytest.raises(ScenarioError) as info:
        load_scenario(CONFIGS[0].parent / "quickstart.yaml", [item])
    assert str(info.value).startswith(text), str(info.value)
    assert "\n" not in str(info.value)


def test_set_walks_into_a_bad_section():
    d = _with("training", [1])
    with pytest.raises(ScenarioError, match="training is \\[1\\], not a section"):
        apply_overrides(d, ["training.rounds=2"])


# ------------------------------------------------------------------------------- data files


def test_check_data_files_missing_and_corrupt(tmp_path):
    s = scenario_from_dict(BASE)
    with pytest.raises(mdata.MissingFileError) as info:
        check_data_files(s, tmp_path)
    assert "breastmnist.npz" in str(info.value)
    assert any("adrenalmnist3d_64.npz" in n for n in info.value.__notes__)
    for flag, size in s.datasets():
        write_synthetic_npz(tmp_path, flag, size=size, n_train=4, n_val=2, n_test=2)
    with pytest.raises(mdata.ChecksumError, match="breastmnist.npz"):
        check_data_files(s, tmp_path)


@pytest.mark.real_data
@pytest.mark.skipif(not all((REAL_DATA / f).exists() for f in
                            ("breastmnist.npz", "pneumoniamnist.npz", "retinamnist.npz")),
                    reason="real MedMNIST files not present")
def test_check_data_files_real():
    check_data_files(load_scenario(CONFIGS[0].parent / "quickstart.yaml"), REAL_DATA)


# ------------------------------------------------------------------------------- partitioning


def _labels(n=2000, classes=5, seed=1):
    return np.random.default_rng(seed).integers(0, classes, size=(n, 1))


def _skew(labels, parts) -> float:
    """Mean total-variation distance between each part's label histogram and the global one."""
    y = labels.reshape(-1)
    k = y.max() + 1
    glob = np.bincount(y, minlength=k) / len(y)
    tv = [0.5 * np.abs(np.bincount(y[p], minlength=k) / len(p) - glob).sum() for p in parts]
    return float(np.average(tv, weights=[len(p) for p in parts]))


def _assert_partition(parts, n, k):
    assert len(parts) == k
    assert all(len(p) > 0 and p.dtype == np.int64 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_partition_covers_every_index_once(method):
    y = _labels()
    parts = partition_indices(y, 10, method, 0.3, 0)
    _assert_partition(parts, len(y), 10)
    assert all(np.array_equal(a, b) for a, b in
               zip(parts, partition_indices(y, 10, method, 0.3, 0)))
    other = partition_indices(y, 10, method, 0.3, 1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_parts_are_equal_sized():
    sizes = [len(p) for p in partition_indices(_labels(n=1003), 10, "iid", 0.5, 0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_is_more_label_skewed_than_iid():
    y = _labels()
    iid = _skew(y, partition_indices(y, 10, "iid", 0.3, 0))
    dirichlet = _skew(y, partition_indices(y, 10, "dirichlet", 0.3, 0))
    assert iid < 0.1 and dirichlet > 0.3 and dirichlet > 4 * iid, (iid, dirichlet)
    assert _skew(y, partition_indices(y, 10, "dirichlet", 100.0, 0)) < dirichlet


def test_dirichlet_never_leaves_a_part_empty():
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2])
    for seed in range(20):
        _assert_partition(partition_indices(y, 12, "dirichlet", 0.01, seed), 12, 12)


def test_dirichlet_multi_label_rows():
    y = np.random.default_rng(0).integers(0, 2, size=(300, 4))
    _assert_partition(partition_indices(y, 5, "dirichlet", 0.5, 0), 300, 5)


@pytest.mark.parametrize("args, match", [
    ((np.zeros(3), 4, "iid", 0.5, 0), "cannot split 3 examples"),
    ((np.zeros(3), 0, "iid", 0.5, 0), "positive integer"),
    ((np.zeros(3), 2, "random", 0.5, 0), "unknown partition method"),
    ((np.zeros(3), 2, "dirichlet", 0.0, 0), "alpha must be > 0"),
])
def test_partition_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        partition_indices(*args)


# ------------------------------------------------------------------------------- property test


def _schema_paths(cls=Scenario, prefix=""):
    """Every dotted key path of the schema (list items as index 0/1)."""
    out = []
    for name, tp in get_type_hints(cls).items():
        path = f"{prefix}{name}"
        out.append(path)
        args = [a for a in get_args(tp) if a is not type(None)]
        if get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
            tp = args[0]
        if dataclasses.is_dataclass(tp):
            out += _schema_paths(tp, path + ".")
        elif get_origin(tp) is list:
            for i in (0, 1):
                out.append(f"{path}.{i}")
                out += _schema_paths(get_args(tp)[0], f"{path}.{i}.")
    return out


PATHS = _schema_paths() + ["pretext.mae", "pretext.contrastive", "model.overrides.depth",
                           "junk", "training.junk", "hospitals.7.size"]
WORDS = ["breastmnist", "adrenalmnist3d", "vesselmnist3d", "fedprox", "trimmed-mean", "dirichlet",
         "iid", "mae", "contrastive", "tiny", "sgd", "rdp", "client", "x y", "a-0"]
scalars = (st.none() | st.booleans() | st.integers(-5, 70_000) | st.integers()
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(WORDS)
           | st.text(max_size=8))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(WORDS + ["parts", "name", "dataset"]) | st.text(max_size=4)
                      | st.integers(), inner, max_size=3),
    max_leaves=6,
)


def _mutate(d: dict, path: str, value, delete: bool) -> None:
    node = d
    *head, last = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in head:
        if isinstance(node, list):
            if not isinstance(k, int) or k >= len(node):
                return
            node = node[k]
        elif isinstance(node, dict):
            if not isinstance(node.get(k), (dict, list)):
                node[k] = {}
            node = node[k]
        else:
            return
    if isinstance(node, dict):
        node.pop(last, None) if delete else node.__setitem__(last, value)
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node.pop(last) if delete else node.__setitem__(last, value)


def _loads_or_scenario_error(build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            s = build()
        except ScenarioError as e:
            assert str(e) and "\n" not in str(e)
            return
    assert isinstance(s, Scenario)
    assert scenario_from_dict(s.to_dict()) == s


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PATHS), values, st.booleans()), min_size=1, max_size=4))
def test_mutated_scenarios_load_or_raise_scenario_error(mutations):
    d = load_scenario(CONFIGS[0].parent / "five-hospitals.yaml").to_dict()
    for path, value, delete in mutations:
        _mutate(d, path, value, delete)
    _loads_or_scenario_error(lambda: scenario_from_dict(d))


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.sampled_from(PATHS) | st.text(max_size=12), min_size=1, max_size=3),
       st.lists(st.text(max_size=10) | st.sampled_from(WORDS + ["3", "null", "{}", "[1]"]),
                min_size=3, max_size=3))
def test_random_set_overrides_load_or_raise_scenario_error(keys, texts):
    items = [f"{k}={v}" for k, v in zip(keys, texts)]
    base = load_scenario(CONFIGS[0].parent / "quickstart.yaml").to_dict()
    _loads_or_scenario_error(lambda: scenario_from_dict(apply_overrides(base, items)))


@settings(max_examples=200, deadline=None, database=None)
@given(values)
def test_random_documents_load_or_raise_scenario_error(doc):
    _loads_or_scenario_error(lambda: scenario_from_dict(doc))
