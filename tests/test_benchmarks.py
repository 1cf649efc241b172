"""Benchmarks: the quality script's quick mode runs end to end on real data and resumes; helpers are sound.

A smoke test, not a measurement: the numbers of a quick run mean nothing.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.common import mean_std
from benchmarks.quality import METHODS, append_row, read_rows

REPO = Path(__file__).resolve().parent.parent


def test_mean_std_uses_sample_std_and_skips_missing_values():
    assert mean_std([]) == {"mean": None, "std": None, "n": 0}
    assert mean_std([0.5, None, float("nan")]) == {"mean": 0.5, "std": None, "n": 1}
    s = mean_std([1.0, 2.0, 3.0])
    assert s["mean"] == pytest.approx(2.0) and s["std"] == pytest.approx(1.0) and s["n"] == 3


def test_rows_file_survives_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "rows.jsonl"
    append_row(path, {"method": "random_init", "dataset": "breastmnist", "seed": 0})
    with open(path, "a") as f:
        f.write('{"method": "local_on')  # a write interrupted mid-line
    assert [r["method"] for r in read_rows(path)] == ["random_init"]
    append_row(path, {"method": "federated", "dataset": "breastmnist", "seed": 0})  # the next row is not lost
    assert [r["method"] for r in read_rows(path)] == ["random_init", "federated"]


def _quality(out: Path, data_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "benchmarks.quality", "--quick", "--datasets", "breastmnist", "--seeds", "0",
           "--threads", "1", "--data-dir", str(data_dir), "--out", str(out)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_quality_plot_draws_the_columns_it_has_and_leaves_no_temporary_file(tmp_path):
    from benchmarks.quality.plot import plot_quality
    from benchmarks.quality.summary import summarize

    rows = [{"method": m, "dataset": d, "seed": seed, "metrics": {ev: {"auc": auc + 0.01 * seed, "acc": 0.5}}}
            for seed in (0, 1) for d in ("breastmnist", "vesselmnist3d")
            for m, ev, auc in (("random_init", "linear_probe", 0.70), ("federated", "linear_probe", 0.80),
                               ("federated", "fine_tune", 0.85))]
    payload = {"summary": summarize(rows, ["breastmnist", "vesselmnist3d"]), "datasets": ["breastmnist", "vesselmnist3d"],
               "anchors": {"breastmnist": {"auc": 0.901}}, "split": "test"}
    plot_quality(payload, tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.png"]


@pytest.mark.slow
def test_quality_quick_writes_every_row_and_resumes(tmp_path, real_data_dir):
    out = tmp_path / "results"
    proc = _quality(out, real_data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = read_rows(out / "quality-quick.jsonl")
    assert sorted(r["method"] for r in rows) == sorted(METHODS)
    assert {(r["dataset"], r["seed"], r["preset"]) for r in rows} == {("breastmnist", 0, "quick")}
    for r in rows:
        assert r["seconds"] >= 0 and r["fingerprint"]
        for name, m in r["metrics"].items():
            if "auc" in m:
                assert 0.0 <= m["auc"] <= 1.0 and 0.0 <= m["acc"] <= 1.0, (r["method"], name)

    payload = json.loads((out / "quality-quick.json").read_text())
    assert payload["quick"] and "QUICK" in payload["label"]
    machine = payload["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"]
    assert all(machine["versions"][k] for k in ("torch", "flwr", "opacus", "medmnist"))
    assert payload["command"].startswith("python -m benchmarks.quality") and "--quick" in payload["command"]
    assert {r["cpu_model"] for r in rows} == {machine["cpu_model"]}  # each row says where it ran
    assert all(r["cpu_flags"] == machine["cpu_flags"] for r in rows)
    assert payload["rows_measured_on"] == {machine["cpu_model"]: len(METHODS)}
    assert payload["seeds"] == [0] and payload["wall_seconds"] >= 0
    assert payload["complete"] and payload["rows_done"] == len(METHODS)
    cells = payload["summary"]["table"]["breastmnist"]
    for column in ("random_init", "local_only", "federated_probe", "centralized", "federated_finetune",
                   "supervised_scratch"):
        assert 0.0 <= cells[column]["auc"]["mean"] <= 1.0, column
    le = payload["summary"]["label_efficiency"]["breastmnist"]
    assert {"federated@0.01", "random@0.01", "federated@0.1", "random@0.1", "federated@1", "random@1"} <= set(le)
    assert payload["anchors"]["breastmnist"]["auc"] == 0.901
    assert {t["status"] for t in payload["targets"]} <= {"met", "missed", "n/a"}
    md = (out / "quality-quick.md").read_text()
    assert "QUICK MODE" in md and "breastmnist" in md and "wall time" in md
    assert payload["plot"] == "quality-quick.png" and f"]({payload['plot']})" in md
    assert (out / "quality-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Rerunning the same command resumes: nothing is redone, no row is duplicated.
    again = _quality(out, real_data_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 to run" in again.stderr
    assert len(read_rows(out / "quality-quick.jsonl")) == len(rows)

    from benchmarks import report
    text = report.build(out)
    assert "QUICK MODE" in text and "breastmnist" in text and "earlier configurations" not in text
    (out / "conv-old").mkdir()  # an earlier configuration's full benchmark, kept whole
    (out / "conv-old" / "quality-full.md").write_text("# Learning quality\n")
    assert "[conv-old](results/conv-old/quality-full.md)" in report.build(out)


def test_fingerprints_follow_the_resolved_architecture_not_the_preset_name(tmp_path, monkeypatch):
    """Rows of one architecture are never counted for another that the same preset name came to mean."""
    import dataclasses

    from benchmarks.quality.experiment import PRESETS, Experiment
    from medformer import model

    def experiment():
        return Experiment("full", PRESETS["full"], ["breastmnist", "adrenalmnist3d"], "unused", tmp_path)

    before = experiment()
    name = before.scenario.model.preset
    monkeypatch.setitem(model.PRESETS, name, dataclasses.replace(model.PRESETS[name], depth=2))
    after = experiment()
    assert after.scenario.to_dict() == before.scenario.to_dict()
    assert after.fingerprint != before.fingerprint
    assert after.pretrain_fingerprint != before.pretrain_fingerprint


def test_a_later_model_field_keeps_fingerprints_at_its_former_value_and_changes_them_off_it(tmp_path, monkeypatch):
    """``stem_depth_3d`` came after rows were stored: at 1 (the model those rows used) the fingerprints
    are what they were without the field; at 2 they change, the scratch fine-tunes' included."""
    import dataclasses

    from benchmarks.quality.experiment import LATER_MODEL_FIELDS, PRESETS, Experiment, architecture
    from medformer import model

    def experiment():
        return Experiment("full", PRESETS["full"], ["breastmnist", "adrenalmnist3d"], "unused", tmp_path)

    before = experiment()
    name = before.scenario.model.preset
    assert set(LATER_MODEL_FIELDS) <= set(dataclasses.asdict(before.cfg))
    assert not set(LATER_MODEL_FIELDS) & set(architecture(before.cfg))
    monkeypatch.setitem(model.PRESETS, name, dataclasses.replace(model.PRESETS[name], stem_depth_3d=2))
    after = experiment()
    assert architecture(after.cfg)["stem_depth_3d"] == 2
    assert "stem_depth_2d" not in architecture(after.cfg)
    assert after.fingerprint != before.fingerprint
    assert after.row_fingerprint("supervised_scratch") != before.row_fingerprint("supervised_scratch")
    assert after.row_fingerprint("cnn_scratch") == before.row_fingerprint("cnn_scratch")


@pytest.mark.parametrize("field,argument", [("fine_tune_warmup", "warmup"), ("fine_tune_ema", "ema"),
                                            ("fine_tune_head_first", "head_first")])
def test_a_later_preset_field_keeps_fingerprints_at_its_former_value_and_changes_them_off_it(tmp_path, field, argument):
    """``fine_tune_warmup``, ``fine_tune_ema`` and ``fine_tune_head_first`` came after rows were
    stored: at 0 they are out of every fingerprint; off 0 they change the fine-tuning rows' (the
    CNN's too) and leave the pretrainings and the rows that only probe alone."""
    from benchmarks.quality.experiment import LATER_PRESET_FIELDS, PRESETS, Experiment, preset_fields, with_overrides

    def experiment(preset):
        return Experiment("full", preset, ["breastmnist", "adrenalmnist3d"], "unused", tmp_path)

    former = dataclasses.replace(PRESETS["full"], **LATER_PRESET_FIELDS)  # the recipe the stored rows ran
    assert not set(LATER_PRESET_FIELDS) & set(preset_fields(former))
    before, after = experiment(former), experiment(with_overrides(former, fields=[f"{field}=0.1"]))
    assert getattr(after.preset, field) == 0.1 and after.preset.fine_tune_kwargs(0)[argument] == 0.1
    for method in ("supervised_scratch", "cnn_scratch", "federated", "label_efficiency"):
        assert after.row_fingerprint(method) != before.row_fingerprint(method), method
    for method in ("random_init", "local_only", "centralized", "dp_federated"):
        assert after.row_fingerprint(method) == before.row_fingerprint(method), method
        assert after.row_fingerprint(method, probe=False) == before.row_fingerprint(method, probe=False), method
    assert after.pretrain_fingerprint == before.pretrain_fingerprint


def test_a_new_encoder_lr_changes_the_fine_tuning_rows_fingerprints_and_leaves_the_probes_found(tmp_path):
    """The rows that only probe were stored under encoder lr 1e-3; the recipe's 3e-4 must still find
    them (``FINE_TUNE_FIELDS_PROBES_SAW``) and give every fine-tuning row a new fingerprint."""
    from benchmarks.quality.experiment import PRESETS, Experiment

    def experiment(preset):
        return Experiment("full", preset, ["breastmnist", "adrenalmnist3d"], "unused", tmp_path)

    before = experiment(dataclasses.replace(PRESETS["full"], fine_tune_encoder_lr=1e-3))
    after = experiment(dataclasses.replace(PRESETS["full"], fine_tune_encoder_lr=3e-4))
    for method in ("supervised_scratch", "cnn_scratch", "federated", "label_efficiency"):
        assert after.row_fingerprint(method) != before.row_fingerprint(method), method
    for method in ("random_init", "local_only", "centralized", "dp_federated"):
        assert after.row_fingerprint(method) == before.row_fingerprint(method), method
    assert after.pretrain_fingerprint == before.pretrain_fingerprint


def test_the_holdout_split_scores_a_stratified_share_of_train_and_never_reads_test():
    """``holdout_split``: the rows learn from train less a class-stratified HOLDOUT_SHARE and are
    scored on that share, the same examples every time; val is untouched and test is not kept."""
    from benchmarks.quality.experiment import HOLDOUT_SHARE, holdout_split
    from medformer.data import MedMNISTSplit

    n = 200
    index_images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)  # each image names its index
    labels = (np.arange(n) % 3 == 0).astype(np.int64).reshape(n, 1)
    whole = {name: MedMNISTSplit("breastmnist", name, 28, index_images.copy(), labels.copy())
             for name in ("train", "val", "test")}
    scored = holdout_split(whole, "binary-class")
    held, kept = set(scored["test"].images.ravel()), set(scored["train"].images.ravel())
    assert scored["val"] is whole["val"] and scored["test"].split == "train"
    assert len(held) == round(HOLDOUT_SHARE * n) and not held & kept and held | kept == set(range(n))
    for c in (0, 1):  # every class keeps its share in the held-out part
        assert abs((scored["test"].labels == c).sum() / (labels == c).sum() - HOLDOUT_SHARE) < 0.02
    assert np.array_equal(holdout_split(whole, "binary-class")["test"].images, scored["test"].images)


def test_an_experiment_scores_the_holdout_split_only_under_holdout(tmp_path, real_data_dir):
    from benchmarks.quality.experiment import PRESETS, Experiment

    def experiment(split):
        return Experiment("quick", PRESETS["quick"], ["breastmnist"], str(real_data_dir), tmp_path, split=split)

    val, holdout = experiment("val"), experiment("holdout")
    assert val.scored_splits("breastmnist") is val.splits("breastmnist")
    whole, scored = holdout.splits("breastmnist"), holdout.scored_splits("breastmnist")
    assert len(scored["train"]) + len(scored["test"]) == len(whole["train"]) and scored["val"] is whole["val"]
    assert holdout.fingerprint != val.fingerprint and holdout.pretrain_fingerprint == val.pretrain_fingerprint


def test_quality_evaluate_scores_a_subset_of_a_federation_of_all(tmp_path, real_data_dir):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks.quality", "--quick", "--seeds", "0", "--threads", "1",
           "--datasets", "breastmnist,retinamnist", "--evaluate", "retinamnist", "--methods", "federated",
           "--split", "val", "--data-dir", str(real_data_dir), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(r["method"], r["dataset"]) for r in read_rows(out / "quality-quick-val.jsonl")] == [
        ("federated", "retinamnist")]
    payload = json.loads((out / "quality-quick-val.json").read_text())
    assert payload["datasets"] == ["breastmnist", "retinamnist"]  # the summary is the whole experiment's
    assert payload["summary"]["table"]["breastmnist"]["federated_probe"]["auc"]["n"] == 0
    assert payload["rows_done"] == 1 and not payload["complete"]
    # The federation still had both hospitals: breast's site trained in every round.
    import torch
    (cached,) = (out / "cache").glob("*/federated-seed0.pt")
    log = json.loads(torch.load(cached, weights_only=True)["log"])
    assert set(log["loss_per_round"]) == {"breastmnist", "retinamnist"}

    bad = subprocess.run([*cmd[:-4], "--evaluate", "vesselmnist3d", *cmd[-4:]], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--evaluate vesselmnist3d" in bad.stderr


def test_the_summary_says_which_machines_its_rows_ran_on_when_another_wrote_it():
    from benchmarks.quality.summary import UNRECORDED_CPU, measured_on_line, rows_measured_on
    from benchmarks.report import _row_cpus

    rows = [{"cpu_model": "Xeon"}, {"cpu_model": "Xeon"}, {}]
    counts = rows_measured_on(rows)
    assert counts == {"Xeon": 2, UNRECORDED_CPU: 1}
    assert measured_on_line({"rows_measured_on": counts}) == "- rows measured on: Xeon (2 rows); not recorded (1 row)"
    assert _row_cpus({"machine": {"cpu_model": "Xeon"}, "rows_measured_on": {"Xeon": 3}}) == ""
    assert "rows ran on: Xeon (2 rows); not recorded (1 row)" in _row_cpus(
        {"machine": {"cpu_model": "EPYC"}, "rows_measured_on": counts})


def test_paired_cell_shows_seeds_only_when_there_are_several():
    from benchmarks.quality.summary import paired_cell

    assert paired_cell({**mean_std([]), "values": []}) == "—"
    assert paired_cell({**mean_std([0.082]), "values": [0.082]}) == "+0.082"
    two = paired_cell({**mean_std([0.08, 0.04]), "values": [0.08, 0.04]})
    assert two.startswith("+0.060 ± ") and two.endswith("(+0.080, +0.040)"), two


def test_throughput_verdict_holds_dp_sgd_to_the_issue_s_1_6x_and_the_report_shows_that_bound():
    from benchmarks import report, throughput

    def fig(dp: bool, best: float) -> "throughput.Figure":
        return throughput.Figure("2d-28", "mae", dp, 256, 10, best, best, best, 256 / best)

    slow = throughput.summarise([fig(False, 1000.0), fig(True, 1000.0 / 1.7)])
    fast = throughput.summarise([fig(False, 1000.0), fig(True, 1000.0 / 1.5)])
    assert slow["meets_dp_slowdown_target"] == {"2d-28/mae": False}
    assert fast["meets_dp_slowdown_target"] == {"2d-28/mae": True}
    figures = [vars(fig(False, 1000.0)), vars(fig(True, 1000.0 / 1.7))]
    result = {"figures": figures, "summary": slow, "threads": 2, "preset": "medformer_small_conv49_fr3d",
              "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}, "load_average_at_end": [0.0],
              "machine": {"cores_usable": 2, "cpu_model": "test CPU",
                          "versions": {"torch": "t", "flwr": "f", "opacus": "o"}}}
    text = "\n".join(report.throughput_section(result))
    assert "≤ 1.6x" in text and "1.70x" in text and "missed" in text
    faster = {**result, "preset": "medformer_small_conv49", "summary": fast,
              "figures": [vars(fig(False, 1000.0)), vars(fig(True, 1000.0 / 1.5))]}
    both = "\n".join(report.throughput_section(result, [("throughput-default", faster)]))
    assert both.count("| 2d-28 | mae |") == 2 and "1.50x" in both and "1.70x" in both
    assert "`medformer_small_conv49`" in both and "(results/throughput-default.md)" in both


def test_method_costs_sum_cpu_minutes_per_seed_and_average_auc_only_over_complete_columns():
    from benchmarks.quality.summary import cost_table, method_costs, summarize

    def row(method, dataset, seed, seconds, threads, **metrics):
        return {"method": method, "dataset": dataset, "seed": seed, "seconds": seconds, "threads": threads,
                "metrics": {k: {"auc": v} for k, v in metrics.items()}}

    rows = [row("random_init", "a", 0, 60, 2, linear_probe=0.6), row("random_init", "b", 0, 60, 2, linear_probe=0.8),
            row("random_init", "a", 1, 120, 1, linear_probe=0.7), row("random_init", "b", 1, 0, 1, linear_probe=0.9),
            row("federated", "a", 0, 600, 1, linear_probe=0.9, fine_tune=0.95)]
    # Seeds run unevenly: dataset a has three, b one (an hour-long row); a seed costs a's mean plus b's.
    rows += [row("cnn_scratch", "a", s, 60, 1, fine_tune=0.8) for s in (0, 1, 2)]
    rows += [row("cnn_scratch", "b", 0, 3600, 1, fine_tune=0.8)]
    costs = method_costs(rows, summarize(rows, ["a", "b"]), ["a", "b"])
    assert list(costs) == ["random_init", "federated", "cnn_scratch"]
    assert costs["random_init"]["cpu_minutes_per_seed"] == pytest.approx((120 + 120) / 2 / 60 + (120 + 0) / 2 / 60)
    assert costs["cnn_scratch"]["cpu_minutes_per_seed"] == pytest.approx(1 + 60)
    assert costs["random_init"]["mean_auc"] == {"random init + LP": pytest.approx(0.75)}
    assert costs["federated"]["mean_auc"] == {}  # dataset b has no federated row yet: no mean claimed
    assert costs["federated"]["partial"] and not costs["cnn_scratch"]["partial"]
    assert "not every dataset yet" in "\n".join(cost_table(costs))


def test_rows_that_read_no_pretraining_keep_their_fingerprint_under_another_pretext(tmp_path, monkeypatch):
    import dataclasses

    from benchmarks.quality.experiment import PRESETS, PRETEXT_FREE, Experiment, with_overrides
    from medformer import model

    def fingerprints(**overrides):
        preset = with_overrides(PRESETS["full"], **overrides)
        exp = Experiment("full", preset, ["breastmnist", "adrenalmnist3d"], "unused", tmp_path)
        return {m: exp.row_fingerprint(m) for m in METHODS}

    base = fingerprints()
    pretext = fingerprints(sets=["pretext={mae: 1.0}", "training.rounds=2"])
    assert {m for m in METHODS if pretext[m] == base[m]} == set(PRETEXT_FREE)
    recipe = fingerprints(fields=["min_steps=10"])
    assert all(recipe[m] != base[m] for m in METHODS)
    name = Experiment("full", PRESETS["full"], ["breastmnist"], "unused", tmp_path).scenario.model.preset
    monkeypatch.setitem(model.PRESETS, name, dataclasses.replace(model.PRESETS[name], depth=2))
    architecture = fingerprints()
    assert {m for m in METHODS if architecture[m] == base[m]} == {"cnn_scratch"}


@pytest.mark.parametrize(("name", "value"), [("PROBE_READOUT", "the last block only"), ("DEFAULT_CS", (0.1, 1.0))])
def test_a_new_probe_read_out_changes_exactly_the_probed_rows_fingerprints(tmp_path, monkeypatch, name, value):
    """A new read-out or C grid re-scores the probe rows only."""
    from benchmarks.quality import experiment
    from benchmarks.quality.experiment import PRESETS, PROBED, Experiment

    exp = Experiment("full", PRESETS["full"], ["breastmnist", "adrenalmnist3d"], "unused", tmp_path)
    before = {m: exp.row_fingerprint(m) for m in METHODS}
    base = {m: exp.row_fingerprint(m, probe=False) for m in METHODS}
    monkeypatch.setattr(experiment, name, value)
    after = {m: exp.row_fingerprint(m) for m in METHODS}
    assert {m for m in METHODS if after[m] != before[m]} == set(PROBED)
    assert {m: exp.row_fingerprint(m, probe=False) for m in METHODS} == base
    assert {m for m in METHODS if base[m] == before[m]} == set(METHODS) - set(PROBED)


def _quick_val_rows(tmp_path: Path, data_dir: Path, methods: str):
    """A quick validation run of ``methods`` on breast: (its output folder, its Experiment, the command)."""
    from benchmarks.quality.experiment import PRESETS, Experiment

    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "benchmarks.quality", "--quick", "--seeds", "0", "--threads", "1",
           "--datasets", "breastmnist", "--methods", methods, "--split", "val", "--no-report",
           "--data-dir", str(data_dir), "--out", str(out)]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    return out, Experiment("quick", PRESETS["quick"], ["breastmnist"], str(data_dir), out, split="val"), cmd


@pytest.mark.slow
def test_a_new_probe_read_out_refits_the_probe_and_keeps_the_federated_fine_tune(tmp_path, real_data_dir):
    """Rows written under another read-out (here: as the version before read-outs were fingerprinted
    wrote them) are re-probed; the federated row takes their fine-tune and carries their compute."""
    out, exp, cmd = _quick_val_rows(tmp_path, real_data_dir, "random_init,federated")
    jsonl = out / "quality-quick-val.jsonl"
    rows = {r["method"]: r for r in read_rows(jsonl)}
    assert "fine_tune" in rows["federated"]["metrics"]
    older = []
    for m, r in rows.items():
        r = {k: v for k, v in r.items() if k != "base_fingerprint"}
        r["fingerprint"] = exp.row_fingerprint(m, probe=False)
        r["metrics"]["linear_probe"]["seconds"] = 1.0
        r["seconds"] = 1000.0
        older.append(r)
    older[-1]["metrics"]["fine_tune"] = {"auc": 0.123, "acc": 0.456}  # marks the fine-tune to be taken
    assert older[-1]["method"] == "federated"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in older))

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "2 to run" in again.stderr, again.stderr[-3000:]
    new = {r["method"]: r for r in read_rows(jsonl)[2:]}
    assert set(new) == {"random_init", "federated"}
    for m, r in new.items():
        assert r["fingerprint"] == exp.row_fingerprint(m) != exp.row_fingerprint(m, probe=False)
        assert r["reprobed"]["seconds_carried"] == pytest.approx(999.0) and r["seconds"] >= 999.0
        assert r["metrics"]["linear_probe"]["auc"] == pytest.approx(rows[m]["metrics"]["linear_probe"]["auc"])
    assert new["federated"]["metrics"]["fine_tune"] == {"auc": 0.123, "acc": 0.456}


def test_a_row_of_the_whole_experiment_fingerprint_is_restamped_and_reused(tmp_path, real_data_dir):
    """Rows written before per-row fingerprints are found, appended again under their own, and then
    survive a change of pretext (rows without a probe: a probed row's probe is refitted instead)."""
    out, exp, cmd = _quick_val_rows(tmp_path, real_data_dir, "cnn_scratch")
    jsonl = out / "quality-quick-val.jsonl"
    (row,) = read_rows(jsonl)
    assert row["fingerprint"] == exp.row_fingerprint("cnn_scratch") != exp.fingerprint
    jsonl.write_text(json.dumps({**row, "fingerprint": exp.fingerprint}) + "\n")  # as an older version wrote it

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 to run" in again.stderr, again.stderr[-3000:]
    legacy, restamped = read_rows(jsonl)
    assert restamped["fingerprint"] == row["fingerprint"] and restamped["restamped_from"] == exp.fingerprint
    assert restamped["metrics"] == legacy["metrics"] == row["metrics"]

    other = subprocess.run(cmd + ["--set", "pretext={mae: 1.0}"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert other.returncode == 0 and "0 to run" in other.stderr, other.stderr[-3000:]
    assert len(read_rows(jsonl)) == 2


@pytest.mark.parametrize("gains, seeds, status", [
    ({"breastmnist": 0.12, "pneumoniamnist": 0.04, "retinamnist": -0.06}, 1, "n/a"),  # two datasets still open
    ({"breastmnist": 0.12, "pneumoniamnist": 0.04, "retinamnist": 0.05}, 1, "met"),
    ({"breastmnist": 0.12, "pneumoniamnist": 0.04, "retinamnist": 0.05}, 3, "n/a"),  # 1 of 3 seeds so far
    ({"breastmnist": 0.12, "pneumoniamnist": -0.01, "retinamnist": -0.06, "adrenalmnist3d": 0.0}, 1, "missed"),
])
def test_a_count_target_is_settled_only_when_the_rows_not_run_cannot_change_it(gains, seeds, status):
    from benchmarks.common import DATASETS
    from benchmarks.quality.summary import evaluate_targets, summarize

    rows = [{"method": "label_efficiency", "dataset": d, "seed": 0,
             "metrics": {"federated@0.1": {"auc": 0.6 + g, "acc": 0.5}, "random@0.1": {"auc": 0.6, "acc": 0.5}}}
            for d, g in gains.items()]
    targets = evaluate_targets(summarize(rows, list(DATASETS)), list(DATASETS), 0.0, complete=False, seeds=seeds,
                               judge=True)
    (t,) = [t for t in targets if "10% labels" in t["target"]]
    assert t["status"] == status and t["kind"] == "count", t


def test_a_count_target_margin_reads_as_datasets_to_spare_or_short():
    from benchmarks.quality.summary import target_margin

    def margin(m, status):
        return target_margin({"kind": "count", "margin": m, "status": status})

    assert margin(0.0, "met") == " (0 datasets to spare)"
    assert margin(1.0, "met") == " (1 dataset to spare)"
    assert margin(-2.0, "missed") == " (2 datasets short)"
    assert margin(None, "n/a") == ""


def test_a_target_is_judged_on_every_seed_and_the_time_target_on_the_whole_benchmark():
    from benchmarks.common import DATASETS
    from benchmarks.quality.summary import evaluate_targets, summarize

    rows = [{"method": m, "dataset": "breastmnist", "seed": s, "metrics": {"fine_tune": {"auc": auc, "acc": 0.5}}}
            for m, auc in (("federated", 0.95), ("cnn_scratch", 0.90)) for s in (0, 1)]

    def status(seeds, complete=False, judge=True):
        targets = evaluate_targets(summarize(rows, list(DATASETS)), list(DATASETS), 3600.0, complete=complete,
                                   seeds=seeds, judge=judge)
        by = {t["target"]: t for t in targets}
        return (by["breastmnist: federated SSL + fine-tune >= the small supervised CNN"]["status"],
                by["breastmnist: federated SSL + fine-tune AUC >= ResNet-18 (28) 0.901"]["status"],
                by["whole quality benchmark within 3 h of summed row time on 2 cores"]["status"])

    assert status(2) == ("met", "met", "n/a")
    assert status(3) == ("n/a", "n/a", "n/a")  # two of three seeds: the mean may still move
    assert status(2, complete=True) == ("met", "met", "met")
    assert status(2, complete=True, judge=False) == ("n/a", "n/a", "n/a")  # quick mode or validation


def test_ft_overrides_are_typed_and_a_bad_one_is_named(tmp_path):
    import dataclasses

    from benchmarks.quality.experiment import FT_FIELDS, PRESETS, Preset, with_overrides

    assert set(FT_FIELDS) | {"sets", "dp_sets"} == {f.name for f in dataclasses.fields(Preset)}
    p = with_overrides(PRESETS["full"], fields=["fine_tune_encoder_lr=3e-4", "min_steps=300.0",
                                                "label_fractions=[0.1]", "validations=none"])
    assert (p.fine_tune_encoder_lr, p.min_steps, p.label_fractions, p.validations) == (3e-4, 300, (0.1,), None)
    assert isinstance(p.fine_tune_encoder_lr, float) and isinstance(p.min_steps, int)
    for bad, says in (("fine_tune_lr=fast", "expected a number"), ("min_steps=1.5", "expected an integer"),
                      ("fine_tune_lr=none", "expected a number"), ("dp_sets=[]", "--dp-set"),
                      ("fine_tune_augment=flip", "choose from none"), ("lr=1", "FIELD one of")):
        with pytest.raises(ValueError, match=says):
            with_overrides(PRESETS["full"], fields=[bad])


def test_the_dp_row_follows_its_resolved_privacy_settings(tmp_path):
    import dataclasses

    from benchmarks.quality.experiment import PRESETS, Experiment

    exp = Experiment("full", PRESETS["full"], ["breastmnist"], "unused", tmp_path)
    before = {m: exp.row_fingerprint(m) for m in METHODS}
    # As if a privacy default changed (the clip norm): the preset's dp_sets strings stay the same.
    privacy = dataclasses.replace(exp.dp_scenario.privacy, max_grad_norm=exp.dp_scenario.privacy.max_grad_norm * 2)
    exp.dp_scenario = dataclasses.replace(exp.dp_scenario, privacy=privacy)
    after = {m: exp.row_fingerprint(m) for m in METHODS}
    assert {m for m in METHODS if after[m] != before[m]} == {"dp_federated"}


def test_the_read_out_benchmark_s_every_block_is_the_product_s_probe_features(real_data_dir):
    """What ``benchmarks.probe_readout`` compared as "every block" is what the product's probe reads."""
    import numpy as np
    import torch

    from benchmarks.probe_readout import READOUTS, _columns, pooled_parts
    from medformer.data import load_splits
    from medformer.eval import extract_features
    from medformer.model import build_medformer, make_config

    torch.manual_seed(0)
    model = build_medformer(make_config("tiny", depth=3), ["breastmnist"], downstream_heads=False)
    split = load_splits("breastmnist", size=28, data_dir=real_data_dir)["val"]
    parts = pooled_parts(model, split, "breastmnist", batch=32)
    np.testing.assert_allclose(_columns(READOUTS["every block"], parts), extract_features(model, split, "breastmnist"),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(_columns(READOUTS["last two blocks"], parts),
                                  np.concatenate([parts["block1"], parts["final"]], axis=1))
    assert _columns(READOUTS["final"], parts).shape == (len(split), model.cfg.dim)


@pytest.mark.parametrize(("flag", "shape"), [("breastmnist", (3, 1, 28, 28)), ("retinamnist", (3, 3, 28, 28)),
                                             ("adrenalmnist3d", (2, 1, 28, 28, 28))])
def test_small_cnn_channels_last_computes_what_the_c_order_layout_does(flag, shape):
    """The baseline's channels-last layout is a speed choice only: same outputs and gradients."""
    from medformer.baselines import small_cnn

    fast = small_cnn(flag, seed=3)
    plain = small_cnn(flag, seed=3)
    plain.memory_format = torch.contiguous_format
    plain.features.to(memory_format=torch.contiguous_format)
    assert any(not p.is_contiguous() for p in fast.features.parameters())  # the layout did change
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    outs = []
    for model in (fast, plain):
        out = model(x, flag)
        out.square().sum().backward()
        outs.append((out, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    for g_fast, g_plain in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(g_fast, g_plain, rtol=1e-3, atol=1e-5)
