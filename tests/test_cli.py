"""The `medfl` CLI: bad input is exit code 2 with one line and nothing written; real runs end to end."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import QUICKSTART_FAST_SETS
from simulations.cli import main
from tools.processes import descendants

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "simulations" / "configs" / "quickstart.yaml"
# Small enough for CI: tiny model, a few local steps, a capped probe.
FAST = ["--set", "model.preset=tiny", "--set", "training.local_steps=3", "--set", "evaluation.max_train_examples=300"]


def _run_main(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("extra, needle", [
    (["--set", "training.roundz=2"], "training.roundz"),
    (["--set", "hospitals.0.dataset=breastmnst"], "hospitals[0].dataset"),
    (["--set", "training.rounds=-1"], "training.rounds"),
    (["--set", "training.rounds=three"], "training.rounds"),
    (["--resume"], "--resume needs --out"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, real_data_dir, extra, needle):
    out = tmp_path / "out"
    code, err = _run_main(["run", str(QUICKSTART), "--data-dir", str(real_data_dir), "--out", str(out), *extra]
                          if extra != ["--resume"] else ["run", str(QUICKSTART), "--resume"], capsys)
    assert code == 2
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_missing_or_tampered_data_file_is_exit_2(tmp_path, capsys, real_data_dir):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("breastmnist.npz", "pneumoniamnist.npz"):
        shutil.copy(real_data_dir / name, data / name)
    code, err = _run_main(["run", str(QUICKSTART), "--data-dir", str(data), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "retinamnist.npz" in err[0] and str(data) in err[0]
    raw = bytearray((real_data_dir / "retinamnist.npz").read_bytes())
    raw[1000] ^= 0xFF
    (data / "retinamnist.npz").write_bytes(raw)
    code, err = _run_main(["run", str(QUICKSTART), "--data-dir", str(data), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "retinamnist.npz" in err[0] and "MD5" in err[0].upper()
    assert not (tmp_path / "o").exists()
    assert _run_main(["data", "--data-dir", str(data)], capsys)[0] == 2


def test_unknown_command_and_nonempty_out_are_exit_2(tmp_path, capsys, real_data_dir):
    assert _run_main(["frobnicate"], capsys)[0] == 2
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, err = _run_main(["run", str(QUICKSTART), "--data-dir", str(real_data_dir), "--out", str(out)], capsys)
    assert code == 2 and "not empty" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# ---- end to end on the real files (Flower simulation with Ray) --------------------------------------
def _medfl(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "simulations.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _final_arrays(out: Path) -> dict:
    last = sorted((out / "checkpoints").glob("round-*.pt"))[-1]
    return torch.load(last, weights_only=True)["arrays"]


@pytest.mark.slow
def test_quickstart_end_to_end_writes_the_output_folder(quickstart_run):
    out = quickstart_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["scenario"] == "quickstart"
    assert set(summary["clients"]) == {"breast", "pneumonia", "retina"}
    for flag in ("breastmnist", "pneumoniamnist", "retinamnist"):
        for method in ("linear_probe", "random_init"):
            m = summary["downstream"][flag][method]
            assert 0.0 <= m["auc"] <= 1.0 and 0.0 <= m["acc"] <= 1.0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]
    for name in ("config.yaml", "report.md", "loss.png", "downstream_auc.png", "checkpoints/round-0002.pt.sha256"):
        assert (out / name).exists(), name


@pytest.mark.slow
def test_resume_after_kill_9_gives_the_same_final_weights(tmp_path, real_data_dir, quickstart_run):
    # the uninterrupted run is the shared one; this run is killed after round 1 and resumed
    common = ["--data-dir", str(real_data_dir), "--no-progress", *[x for s in QUICKSTART_FAST_SETS for x in ("--set", s)]]
    straight = quickstart_run
    broken = tmp_path / "broken"
    p = subprocess.Popen([sys.executable, "-m", "simulations.cli", "run", str(QUICKSTART), "--out", str(broken),
                          *common], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (broken / "checkpoints" / "round-0001.pt.sha256").exists():
            assert p.poll() is None and time.monotonic() < deadline, "run ended or stalled before round 1"
            time.sleep(0.2)
    finally:
        for pid in [p.pid, *descendants(p.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait()
    assert not (broken / "summary.json").exists()
    proc = _medfl("run", str(QUICKSTART), "--out", str(broken), "--resume", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _final_arrays(straight), _final_arrays(broken)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), f"{k} differs after resume"


@pytest.mark.slow
def test_five_hospitals_mix_2d_and_3d_in_one_federation(tmp_path, real_data_dir):
    import json

    out = tmp_path / "five"
    proc = _medfl("run", str(REPO / "simulations" / "configs" / "five-hospitals.yaml"), "--data-dir",
                  str(real_data_dir), "--out", str(out), "--no-progress", "--set", "training.rounds=1",
                  "--set", "training.batch_size=32", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["downstream"]) == {"breastmnist", "pneumoniamnist", "retinamnist", "adrenalmnist3d",
                                          "vesselmnist3d"}
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert set(line["trained"]) == {"breast", "pneumonia", "retina", "adrenal", "vessel"}
    # 3D hospitals carry the 3D tokenizer and decoder, 2D ones do not: they exchange different byte counts.
    sent = line["bytes_sent"]
    assert sent["adrenal"] == sent["vessel"] != sent["breast"] == sent["pneumonia"]
    assert max(sent.values()) < summary["model"]["global_bytes"]


def test_bench_forwards_to_the_benchmark_module(tmp_path, real_data_dir):
    proc = _medfl("bench", "quality", "--plan", "--quick", "--datasets", "breastmnist", "--data-dir",
                  str(real_data_dir), "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["preset"] == "quick" and plan["seeds"] == [0]
    assert {"federated", "dp_federated", "cnn_scratch"} <= set(plan["methods"])
    assert plan["rows"] == len(plan["methods"])  # one dataset, one seed: a row per method
    assert plan["images_per_seed"]["small CNN fine-tunes"] > 0  # the CNN baseline's work is counted too
    bad = _medfl("bench", "quality", "--datasets", "nosuchmnist", "--data-dir", str(real_data_dir),
                 "--out", str(tmp_path))
    assert bad.returncode == 2 and "unknown --datasets nosuchmnist" in bad.stderr
    unknown = _medfl("bench", "speed")
    assert unknown.returncode == 2 and "invalid choice: 'speed'" in unknown.stderr
    assert not list(tmp_path.iterdir())  # a plan of a subset and a refused run write nothing
