"""Fuzzing hostile input: 1,000 generated scenario files and 200 mutated npz files.

Every input must either load or fail with the project's own one-line error (ScenarioError /
DataError, which the CLI turns into exit code 2); any other exception is a crash. Counts are printed.
"""
from __future__ import annotations

import copy
import io
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medformer.data import DataError, load_split
from synthetic import write_synthetic_npz
from simulations.cli import main
from config import ScenarioError, load_scenario

REPO = Path(__file__).resolve().parent.parent
BASE = yaml.safe_load((REPO / "simulations" / "configs" / "five-hospitals.yaml").read_text())

_VALUES = [None, True, False, 0, -1, 1, 2**40, 1e308, float("nan"), float("inf"), -0.5, 0.5, "", "x", "../../etc",
           "breastmnist", "fedavg", [], [1, 2], {}, {"a": 1}, "1e-3", 64, 28, "tiny"]


def _paths(d, prefix=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _mutate(rng: random.Random) -> object:
    doc = copy.deepcopy(BASE)
    for _ in range(rng.randint(1, 4)):
        paths = list(_paths(doc))
        if not paths:
            break
        path = rng.choice(paths)
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        op = rng.random()
        if op < 0.6:
            parent[path[-1]] = rng.choice(_VALUES)
        elif op < 0.75 and isinstance(parent, dict):
            parent[f"{path[-1]}_typo"] = parent.pop(path[-1])
        elif op < 0.9:
            del parent[path[-1]]
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[0]) if parent else None)  # duplicates a hospital
    return doc if rng.random() > 0.02 else rng.choice([None, [], "text", 42])


def test_1000_generated_scenarios_load_or_fail_cleanly(tmp_path):
    rng = random.Random(1234)
    outcomes = {"loaded": 0, "rejected": 0}
    for i in range(1000):
        path = tmp_path / f"s{i}.yaml"
        text = yaml.safe_dump(_mutate(rng)) if rng.random() > 0.05 else "name: [unclosed\n  - :"
        path.write_text(text)
        try:
            load_scenario(path)
            outcomes["loaded"] += 1
        except ScenarioError as e:
            assert "\n" not in str(e), str(e)
            outcomes["rejected"] += 1
    print(f"scenario fuzz: {sum(outcomes.values())} files: {outcomes}")
    assert outcomes["rejected"] > 500 and sum(outcomes.values()) == 1000


def test_cli_turns_hostile_scenarios_into_exit_2(tmp_path, capsys, real_data_dir):
    rng = random.Random(99)
    codes = []
    for i in range(40):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(yaml.safe_dump(_mutate(rng)))
        out = tmp_path / f"out{i}"
        code = main(["run", str(path), "--data-dir", str(real_data_dir), "--out", str(out),
                     "--set", "training.rounds=0"])  # never runs: rounds=0 is itself invalid
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("medfl: error:"), err
        assert not out.exists()
        codes.append(code)
    print(f"CLI fuzz: {len(codes)} hostile scenario files, all exit 2")


def _mutations(raw: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:  # truncate
        return raw[: rng.randrange(len(raw))]
    if kind == 1:  # flip bytes
        b = bytearray(raw)
        for _ in range(rng.randint(1, 20)):
            b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
        return bytes(b)
    with np.load(io.BytesIO(raw)) as z:
        arrays = {k: z[k] for k in z.files}
    key = rng.choice(sorted(arrays))
    if kind == 2:  # wrong dtype
        arrays[key] = arrays[key].astype(rng.choice([np.float32, np.int64, np.int8, np.float16]))
    elif kind == 3:  # renamed or missing key
        value = arrays.pop(key)
        if rng.random() < 0.5:
            arrays[key + "_x"] = value
    elif kind == 4:  # mismatched counts or shapes
        arrays[key] = arrays[key][: max(0, len(arrays[key]) - rng.randint(1, 5))]
        if rng.random() < 0.3:
            arrays[key] = arrays[key].reshape(-1)
    else:  # a pickled object array
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for k, v in arrays.items():
                arr_buf = io.BytesIO()
                np.save(arr_buf, np.array([{"evil": 1}], dtype=object) if k == key else v, allow_pickle=True)
                zf.writestr(k + ".npy", arr_buf.getvalue())
        return buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("flag", ["breastmnist", "retinamnist", "adrenalmnist3d"])
def test_mutated_npz_files_load_or_fail_cleanly(tmp_path, flag):
    source = write_synthetic_npz(tmp_path / "src", flag, n_train=8, n_val=4, n_test=4)
    raw = source.read_bytes()
    rng = random.Random(sum(map(ord, flag)))  # str hash() differs per process
    counts = {"loaded": 0, "rejected": 0}
    n = 70 if flag != "adrenalmnist3d" else 60  # 200 files in all
    for i in range(n):
        d = tmp_path / f"m{i}"
        d.mkdir()
        (d / source.name).write_bytes(_mutations(raw, rng))
        try:
            for split in ("train", "val", "test"):
                load_split(flag, split, data_dir=d, verify=False)
            counts["loaded"] += 1
        except DataError as e:
            assert "\n" not in str(e) and source.name in str(e), str(e)
            counts["rejected"] += 1
    print(f"npz fuzz {flag}: {n} files: {counts}")
    assert counts["rejected"] > n // 2


# ---- property-based: hypothesis drives the byte-level damage --------------------------------------


@pytest.fixture(scope="module")
def synthetic_breast(tmp_path_factory):
    return write_synthetic_npz(tmp_path_factory.mktemp("hyp"), "breastmnist", n_train=8, n_val=4, n_test=4).read_bytes()


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.one_of(st.none(), st.integers(min_value=0, max_value=20_000)),
       flips=st.lists(st.tuples(st.integers(min_value=0, max_value=20_000), st.integers(min_value=1, max_value=255)),
                      max_size=8))
def test_property_damaged_npz_bytes_load_or_raise_data_error(synthetic_breast, tmp_path_factory, cut, flips):
    raw = bytearray(synthetic_breast)
    for pos, x in flips:
        raw[pos % len(raw)] ^= x
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    d = tmp_path_factory.mktemp("case")
    (d / "breastmnist.npz").write_bytes(bytes(raw))
    try:
        for split in ("train", "val", "test"):
            load_split("breastmnist", split, data_dir=d, verify=False)
    except DataError as e:
        assert "\n" not in str(e) and "breastmnist.npz" in str(e)
