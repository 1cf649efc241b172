"""`medfl sweep-privacy` (simulations/sweep.py): budgets become per-run overrides, results become the four
tradeoff files, bad input is exit code 2, and an interrupted sweep picks up where it stopped."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulations import sweep
from simulations.cli import main
from config import ScenarioError, load_scenario

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "simulations" / "configs" / "quickstart.yaml"
QUICKSTART_DP = REPO / "simulations" / "configs" / "quickstart-dp.yaml"


def test_parse_epsilons():
    assert sweep.parse_epsilons("inf, 16,8,0.5") == [math.inf, 16.0, 8.0, 0.5]
    for bad, needle in (("8,x", "'x'"), ("8,0", "> 0"), ("-1", "> 0"), ("8,8", "twice"), ("nan", "> 0")):
        with pytest.raises(sweep.SweepError, match=needle):
            sweep.parse_epsilons(bad)


def test_budget_overrides_reach_every_hospital():
    own = "hospitals.1.privacy={noise_multiplier: 2.0}"
    base = load_scenario(QUICKSTART_DP, [own])
    s = load_scenario(QUICKSTART_DP, [own, *sweep.budget_overrides(base, 4.0)])
    assert [c.privacy.target_epsilon for c in s.clients()] == [4.0, 4.0, 4.0]
    assert all(c.privacy.noise_multiplier is None for c in s.clients())
    assert s.privacy.max_grad_norm == 1.0  # the scenario's other DP settings are kept
    s = load_scenario(QUICKSTART_DP, [own, *sweep.budget_overrides(base, math.inf)])
    assert all(c.privacy is None for c in s.clients())
    per_sample = ["pretext={mae: 1.0, rotation: 0.5}"]  # the quickstart's contrastive task cannot run under DP
    plain = load_scenario(QUICKSTART, per_sample)  # no privacy section at all: the override creates one
    s = load_scenario(QUICKSTART, [*per_sample, *sweep.budget_overrides(plain, 2.0)])
    assert s.privacy.target_epsilon == 2.0 and s.privacy.accountant == "rdp"


def test_plan_validates_every_budget_before_running():
    base, plans = sweep.plan_runs(QUICKSTART_DP, [math.inf, 8.0], 2, ["training.rounds=1"], audit=True)
    assert [(p.name, p.seed) for p in plans] == [("eps-inf-rep-0", 0), ("eps-inf-rep-1", 1), ("eps-8-rep-0", 0),
                                                 ("eps-8-rep-1", 1)]
    assert "evaluation.audit=true" in plans[0].sets and "privacy=null" in plans[0].sets
    with pytest.raises(ScenarioError, match="pretext.contrastive: task 'contrastive' couples"):
        sweep.plan_runs(QUICKSTART_DP, [math.inf, 8.0], 1, ["pretext.contrastive=1.0"], audit=False)
    with pytest.raises(ScenarioError, match="at epsilon 8: pretext.contrastive"):  # the quickstart's own pretext
        sweep.plan_runs(QUICKSTART, [math.inf, 8.0], 1, [], audit=False)


def _summary(auc: float, eps: float | None, audit: float, rounds: int = 2) -> dict:
    clients = {}
    for name, flag in (("a", "breastmnist"), ("b", "pneumoniamnist")):
        clients[name] = {"dataset": flag, "size": 28, "num_examples": 100, "epsilon": eps, "delta": 1e-3,
                         "audit": {"auc": audit, "loss_auc": audit - 0.01, "tpr_at_1pct_fpr": 0.02}}
    down = {flag: {"linear_probe": {"auc": auc, "acc": auc - 0.1}, "random_init": {"auc": 0.6, "acc": 0.5}}
            for flag in ("breastmnist", "pneumoniamnist")}
    return {"scenario": "fake", "rounds_completed": rounds, "rounds_planned": 2, "wall_seconds": 3.0,
            "clients": clients, "downstream": down}


def test_outputs_from_fake_runs(tmp_path, monkeypatch):
    """Orchestration without Flower: each 'run' writes a summary whose AUC depends on (epsilon, seed)."""
    aucs = {("inf", 0): 0.80, ("inf", 1): 0.82, ("4", 0): 0.74, ("4", 1): 0.70, ("1", 0): 0.75, ("1", 1): 0.77}
    calls = []

    def fake_run(config, plan, run_dir, log_path, data_dir, verbose):
        calls.append(plan.name)
        if plan.name == "eps-1-rep-1" and len(calls) < 7:
            return 1  # fails the first time
        run_dir.mkdir(parents=True, exist_ok=True)
        eps = None if math.isinf(plan.epsilon) else plan.epsilon * 0.99
        s = _summary(aucs[(sweep.eps_label(plan.epsilon), plan.seed)], eps, 0.5 + 0.01 * plan.seed)
        (run_dir / "summary.json").write_text(json.dumps(s))
        return 0

    monkeypatch.setattr(sweep, "_run_one", fake_run)
    out = tmp_path / "sweep"
    args = dict(epsilons=[math.inf, 4.0, 1.0], repeats=2, out=out, sets=["training.rounds=2"], progress=False)
    assert sweep.run_sweep(QUICKSTART_DP, **args) == 1  # one run failed
    md = (out / "tradeoff.md").read_text()
    assert "eps-1-rep-1: failed (exit code 1)" in md
    # Rerunning the same command reruns only what is missing.
    assert sweep.run_sweep(QUICKSTART_DP, **args) == 0
    assert calls.count("eps-inf-rep-0") == 1 and calls.count("eps-1-rep-1") == 2
    for name in ("tradeoff.csv", "tradeoff.json", "tradeoff.md", "tradeoff.png"):
        assert (out / name).stat().st_size > 0, name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    rows = list(csv.DictReader((out / "tradeoff.csv").open()))
    assert len(rows) == 3 * 2 * 2 and set(rows[0]) == set(sweep.CSV_FIELDS)
    data = json.loads((out / "tradeoff.json").read_text())
    agg = {(a["dataset"], a["epsilon"]): a for a in data["aggregate"]}
    a = agg[("breastmnist", "4")]
    assert a["auc_mean"] == pytest.approx(0.72) and a["auc_std"] == pytest.approx(0.02828, rel=1e-3)
    assert a["epsilon_spent_mean"] == pytest.approx(3.96) and a["audit_auc_mean"] == pytest.approx(0.505)
    md = (out / "tradeoff.md").read_text()
    assert "| breastmnist | 4 | 0.720 ± 0.028 |" in md
    # AUC goes up from epsilon 4 to 1 (by less than twice the spread): the report says where and why
    assert "AUC rises from 0.720 at epsilon 4 to 0.760 at epsilon 1 (+0.040); within the run-to-run spread" in md
    # A different plan in the same folder is refused, fewer repeats too (they would hide runs).
    for change in ({"repeats": 1}, {"epsilons": [math.inf, 4.0]}):
        with pytest.raises(sweep.SweepError, match="not empty"):
            sweep.run_sweep(QUICKSTART_DP, **{**args, **change})
    # More repeats of the same sweep continue it: only the new repeat's runs start.
    aucs.update({("inf", 2): 0.81, ("4", 2): 0.72, ("1", 2): 0.76})
    assert sweep.run_sweep(QUICKSTART_DP, **{**args, "repeats": 3}) == 0
    assert calls.count("eps-inf-rep-0") == 1 and calls.count("eps-4-rep-2") == 1
    assert len(list(csv.DictReader((out / "tradeoff.csv").open()))) == 3 * 2 * 3
    # The report counts every finished run's own time (3.0 s each in the fake summaries), the reused ones too.
    assert "9 of 9 runs finished, 0.5 min of run time (this invocation" in (out / "tradeoff.md").read_text()
    assert json.loads((out / sweep.PLAN_FILE).read_text())["repeats"] == 3


def test_cli_bad_input_is_exit_2_and_writes_nothing(tmp_path, capsys, real_data_dir):
    out = tmp_path / "sw"
    for extra, needle in ((["--epsilons", "8,abc"], "'abc'"), (["--repeats", "0"], "--repeats"),
                          (["--set", "training.roundz=1"], "training.roundz"),
                          (["--set", "pretext.contrastive=1"], "DP-SGD")):
        code = main(["sweep-privacy", str(QUICKSTART), "--data-dir", str(real_data_dir), "--out", str(out), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], (extra, err)
        assert not out.exists()


@pytest.mark.slow
def test_real_sweep_writes_the_four_files(tmp_path, real_data_dir):
    out = tmp_path / "sweep"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "sweep-privacy", str(QUICKSTART_DP), "--epsilons", "inf,4",
         "--data-dir", str(real_data_dir), "--out", str(out), "--no-progress", "--set", "model.preset=tiny",
         "--set", "training.rounds=1", "--set", "training.local_steps=3", "--set", "evaluation.max_train_examples=300",
         "--set", "evaluation.audit_examples=100"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "tradeoff.csv").open()))
    assert {r["epsilon"] for r in rows} == {"inf", "4"}
    assert {r["dataset"] for r in rows} == {"breastmnist", "pneumoniamnist", "retinamnist"}
    for r in rows:
        assert 0 <= float(r["auc"]) <= 1 and 0 <= float(r["audit_auc"]) <= 1
        assert (r["epsilon_spent"] == "") == (r["epsilon"] == "inf")
        if r["epsilon"] == "4":
            assert float(r["epsilon_spent"]) <= 4.0
    assert (out / "tradeoff.png").stat().st_size > 10_000
    assert "| breastmnist | inf |" in (out / "tradeoff.md").read_text()
