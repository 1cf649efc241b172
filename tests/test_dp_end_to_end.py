"""Record-level DP through the whole federation: what summary.json reports, an independent recomputation of
epsilon, the budget refusing a round it cannot pay for, and contrastive pretext tasks refused under DP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from client.round import train_round
from config import ModelSpec, PrivacySpec, Site, TrainingSpec
from medformer.model import make_config
from medformer.pretext import PretextObjective, build_pretext_model
from medformer.dp.accounting import plan_dp
from protocol import ARRAYS, METRICS, PRIVACY, REFUSAL, RoundInstructions
from server.strategy import KeyedFedAvg
from simulations.cli import main

pytestmark = pytest.mark.usefixtures("flower_task_identity")

REPO = Path(__file__).resolve().parent.parent
QUICKSTART_DP = REPO / "simulations" / "configs" / "quickstart-dp.yaml"
FAST = ["--set", "model.preset=tiny", "--set", "training.local_steps=5", "--set", "evaluation.max_train_examples=300"]
OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def independent_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon straight from Opacus's RDP analysis (Mironov et al. 2019), without the project's code."""
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=OPACUS_ORDERS)
    return float(get_privacy_spent(orders=OPACUS_ORDERS, rdp=rdp, delta=delta)[0])


def test_contrastive_with_privacy_exits_2_before_training(tmp_path, capsys, real_data_dir):
    out = tmp_path / "out"
    code = main(["run", str(QUICKSTART_DP), "--data-dir", str(real_data_dir), "--out", str(out),
                 "--set", "pretext.contrastive=1.0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "pretext.contrastive" in err[0] and "DP-SGD" in err[0] and "per-example" in err[0], err
    assert not out.exists()


# ---- a hospital that cannot pay for its next round ------------------------------------------------


def test_exhausted_budget_trains_nothing_and_the_server_records_a_dropout(real_data_dir):
    cfg, obj = make_config("tiny"), PretextObjective({"mae": 1.0, "rotation": 0.5})
    model = build_pretext_model(cfg, [("breastmnist", 28)], obj)
    training = TrainingSpec(rounds=2, batch_size=64, local_epochs=1.0, local_steps=3, lr=1e-3, weight_decay=0.0,
                            optimizer="adamw")
    privacy = PrivacySpec(target_epsilon=2.0, max_grad_norm=1.0, accountant="rdp")
    site = Site("breast", "breastmnist", 28, data_dir=str(real_data_dir))
    ins = RoundInstructions(round=3, seed=0, site=Site("breast", "breastmnist", 28),
                            model=ModelSpec(preset="tiny"), pretext=dict(obj.weights), mask_ratio=0.75,
                            training=training, privacy=privacy)
    plan = plan_dp(num_examples=546, batch_size=64, steps_per_round=3, rounds=2, target_epsilon=2.0)
    spent = json.dumps({"history": [[plan.noise_multiplier, plan.sample_rate, 6]]})  # both planned rounds done
    received = {k: v.clone() for k, v in model.state_dict().items()}
    out = train_round(ins, site, received, ledger_state=spent, optimizer_state=None)
    trained, result, ledger = out.trained, out.result, out.ledger
    assert result is None and trained == {} and "privacy budget exhausted" in out.refusal
    assert ledger.steps == 6 and ledger.epsilon() <= 2.0  # nothing was spent
    # One round less spent: the hospital trains and lands at (not over) its budget.
    half = json.dumps({"history": [[plan.noise_multiplier, plan.sample_rate, 3]]})
    ins.round = 2
    out = train_round(ins, site, received, ledger_state=half, optimizer_state=None)
    trained, result, ledger = out.trained, out.result, out.ledger
    assert result is not None and ledger.steps == 6 and 1.9 < result.epsilon <= 2.0

    # The server drops the refusal as a dropout with the reason, and keeps the accountant state.
    keys = list(received)
    sites = {7: Site("breast", "breastmnist", 28, num_examples=546),
             8: Site("breast-b", "breastmnist", 28, num_examples=546)}
    arrays = ArrayRecord(array_dict={k: Array(v.numpy()) for k, v in received.items()})

    class Grid:
        def get_node_ids(self):
            return [7, 8]

    strategy = KeyedFedAvg(sites=sites, keys={7: keys, 8: keys}, instructions=lambda s, r: ins)
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(3, arrays, ConfigRecord(), Grid())}
    refusal = Message(content=RecordDict({ARRAYS: ArrayRecord(), PRIVACY: ConfigRecord({"state": spent}),
                                          REFUSAL: ConfigRecord({"reason": "privacy budget exhausted: ..."}),
                                          METRICS: MetricRecord({"num-examples": 0})}), reply_to=msgs[7])
    fine = Message(content=RecordDict({ARRAYS: msgs[8].content[ARRAYS],
                                       METRICS: MetricRecord({"num-examples": 546})}), reply_to=msgs[8])
    strategy.aggregate_train(3, [refusal, fine])
    assert "privacy budget exhausted" in strategy.report.dropped["breast"]
    assert strategy.report.privacy["breast"]["state"] == spent
    assert set(strategy.report.trained) == {"breast-b"}


# ---- the whole federation, twice: R planned rounds, then one round more than planned ------------------
def _medfl(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_reported_epsilon_equals_opacus_recomputation_and_budget_stops_extra_rounds(tmp_path, real_data_dir):
    out = tmp_path / "run"
    # retina gets a fixed noise multiplier (no budget): it keeps training when the others must stop;
    # client-level DP on the server composes with the hospitals' record-level DP-SGD
    common = ["--data-dir", str(real_data_dir), "--no-progress", *FAST,
              "--set", "hospitals.2.privacy={noise_multiplier: 1.0}",
              "--set", "client_dp={noise_multiplier: 1.5, clipping_norm: 1.0}"]
    proc = _medfl("run", str(QUICKSTART_DP), "--out", str(out), "--set", "training.rounds=2", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    for name in ("breast", "pneumonia", "retina"):
        c = summary["clients"][name]
        for key in ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "accountant"):
            assert c.get(key) is not None, (name, key, c)
        assert c["steps"] == 2 * 5 and c["accountant"] == "rdp"
        assert c["delta"] < 1 / c["num_examples"]
        again = independent_epsilon(c["noise_multiplier"], c["sample_rate"], c["steps"], c["delta"])
        assert c["epsilon"] == pytest.approx(again, rel=0.01), name
    for name in ("breast", "pneumonia"):
        assert 7.9 <= summary["clients"][name]["epsilon"] <= 8.0  # calibrated to the budget, never over it
    cdp = summary["client_dp"]
    assert cdp["rounds"] == 2 and cdp["sample_rate"] == 1.0 and cdp["delta"] == pytest.approx(1e-5)
    assert cdp["epsilon"] == pytest.approx(independent_epsilon(1.5, 1.0, 2, 1e-5), rel=0.01)
    # the server's checkpointed accountant state holds the same history
    ckpt = torch.load(out / "checkpoints" / "round-0002.pt", weights_only=True)
    history = json.loads(ckpt["state"]["privacy_states"]["breast"])["history"]
    assert sum(h[2] for h in history) == 10

    # The run is extended by a round nobody budgeted for: breast and pneumonia must refuse it.
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    cfg["training"]["rounds"] = 3
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = _medfl("run", str(QUICKSTART_DP), "--out", str(out), "--resume", "--set", "training.rounds=3", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    dropped = {(d["round"], d["site"]): d["reason"] for d in summary["dropouts"]}
    for name in ("breast", "pneumonia"):
        assert "privacy budget exhausted" in dropped[(3, name)]
        c = summary["clients"][name]
        assert c["steps"] == 10 and c["epsilon"] <= 8.0 and c["rounds_trained"] == 2
    assert summary["clients"]["retina"]["steps"] == 15 and summary["clients"]["retina"]["rounds_trained"] == 3
    assert summary["client_dp"]["rounds"] == 3
    assert summary["client_dp"]["epsilon"] == pytest.approx(independent_epsilon(1.5, 1.0, 3, 1e-5), rel=0.01)
    assert "privacy budget exhausted" in proc.stderr
