"""Reliability under faults: clipped updates, damaged checkpoints, hospitals that fail or poison."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server.checkpoint import CheckpointError, load_checkpoint, load_latest, save_checkpoint
from server.aggregation import clip_update

REPO = Path(__file__).resolve().parent.parent


def test_clip_update_bounds_the_update_norm_and_leaves_small_ones():
    sent = {"a": np.zeros(4, np.float32), "b": np.ones(2, np.float32)}
    big = {"a": np.full(4, 3.0, np.float32), "b": np.full(2, 5.0, np.float32)}
    clipped, norm_before = clip_update(sent, big, 2.0)
    assert norm_before == pytest.approx(np.sqrt(4 * 9 + 2 * 16))
    norm = np.sqrt(sum(((clipped[k] - sent[k]) ** 2).sum() for k in sent))
    assert norm == pytest.approx(2.0, rel=1e-5)
    # direction kept
    ratio = (clipped["a"] - sent["a"]) / (big["a"] - sent["a"])
    assert np.allclose(ratio, ratio[0])
    small = {"a": np.full(4, 0.1, np.float32), "b": np.ones(2, np.float32)}
    same, _ = clip_update(sent, small, 2.0)
    assert all(np.array_equal(same[k], small[k]) for k in small)


def test_damaged_checkpoints_are_refused_and_fallback_is_opt_in(tmp_path):
    d = tmp_path / "ck"
    save_checkpoint(d, 1, {"arrays": {"w": np.zeros(3)}})
    p2 = save_checkpoint(d, 2, {"arrays": {"w": np.ones(3)}})
    assert load_latest(d)["round"] == 2
    p2.write_bytes(p2.read_bytes()[:-20])  # truncated
    with pytest.raises(CheckpointError, match="corrupt or truncated.*--fallback-checkpoint"):
        load_latest(d)
    assert load_latest(d, fallback=True)["round"] == 1
    (d / "round-0002.pt.sha256").unlink()  # interrupted between the two renames
    with pytest.raises(CheckpointError, match="no checksum"):
        load_checkpoint(p2)
    p1 = d / "round-0001.pt"
    raw = bytearray(p1.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p1.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        load_latest(d, fallback=True)
    assert load_latest(tmp_path / "empty") is None


def test_fault_injection_mod_poisons_the_update(flower_task_identity):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from client.faults import InjectedFault, fault_injection_mod
    from config import FaultSpec, ModelSpec, Site, TrainingSpec
    from protocol import RoundInstructions

    def message(fault):
        ins = RoundInstructions(round=1, seed=0, site=Site("h", "breastmnist"), model=ModelSpec(), pretext={},
                                mask_ratio=0.75, training=TrainingSpec(),
                                fault=FaultSpec(hospital="h", **fault) if fault else None)
        content = RecordDict({"arrays": ArrayRecord(array_dict={"w": Array(np.zeros(3, np.float32))}),
                              "config": ConfigRecord({"instructions": ins.to_json()})})
        return Message(content=content, dst_node_id=1, message_type="train")

    def handler(msg, ctx):  # an honest hospital: its update is +1 everywhere
        arrays = ArrayRecord(array_dict={"w": Array(np.ones(3, np.float32))})
        return Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 5})}),
                       reply_to=msg)

    honest = fault_injection_mod(message(None), None, handler)
    assert np.allclose(honest.content["arrays"]["w"].numpy(), 1.0)
    flipped = fault_injection_mod(message({"kind": "sign-flip", "factor": 3.0}), None, handler)
    assert np.allclose(flipped.content["arrays"]["w"].numpy(), -3.0)
    nan = fault_injection_mod(message({"kind": "nan"}), None, handler)
    assert np.isnan(nan.content["arrays"]["w"].numpy()).all()
    extra = fault_injection_mod(message({"kind": "extra-key"}), None, handler)
    assert "inputs.not-mine.weight" in extra.content["arrays"].keys()
    with pytest.raises(InjectedFault):
        fault_injection_mod(message({"kind": "raise"}), None, handler)




def _medfl(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.mark.slow
def test_failing_hanging_and_broken_hospitals_are_skipped_recorded_and_rejoin(tmp_path, real_data_dir):
    out = tmp_path / "run"
    faults = ("faults=[{hospital: breast, kind: raise, rounds: [1]}, {hospital: retina, kind: hang, rounds: [2], "
              "seconds: 25}, {hospital: pneumonia, kind: nan, rounds: [3]}]")
    proc = _medfl("run", str(REPO / "simulations" / "configs" / "quickstart.yaml"), "--data-dir", str(real_data_dir),
                  "--out", str(out), "--no-progress", "--set", "model.preset=tiny", "--set", "training.local_steps=2",
                  "--set", "training.rounds=4", "--set", "strategy.round_timeout=12",
                  "--set", "evaluation.linear_probe=false", "--set", faults)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    drops = {(d["round"], d["site"]): d["reason"] for d in summary["dropouts"]}
    assert "injected fault" in drops[(1, "breast")]
    assert "timeout" in drops[(2, "retina")]
    assert "non-finite" in drops[(3, "pneumonia")]
    assert summary["rounds_completed"] == 4
    assert {n: c["rounds_trained"] for n, c in summary["clients"].items()} == {"breast": 3, "retina": 3, "pneumonia": 3}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["dropped"] == {"breast": drops[(1, "breast")]}
    assert set(lines[3]["trained"]) == {"breast", "retina", "pneumonia"}  # everyone is back in round 4


@pytest.mark.slow
def test_one_poisoned_hospital_breaks_fedavg_but_not_the_median(tmp_path, real_data_dir):
    config = REPO / "simulations" / "configs" / "poisoned.yaml"
    auc = {}
    for rule in ("fedavg", "median"):
        out = tmp_path / rule
        proc = _medfl("run", str(config), "--data-dir", str(real_data_dir), "--out", str(out), "--no-progress",
                      "--set", f"strategy.name={rule}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        auc[rule] = summary["downstream"]["pneumoniamnist"]["linear_probe"]["auc"]
        auc["random_init"] = summary["downstream"]["pneumoniamnist"]["random_init"]["auc"]
    print(f"poisoned hospital (sign-flip x20), linear-probe AUC: {auc}")
    assert auc["fedavg"] < auc["random_init"] - 0.02, auc   # the poisoned average is worse than no training
    assert auc["median"] > auc["fedavg"] + 0.03, auc        # the robust rule holds
    assert auc["median"] > auc["random_init"], auc
