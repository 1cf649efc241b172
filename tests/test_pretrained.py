"""What the federation learned, used: ``medfl export`` (safetensors + config.json + model card),
``medformer.load_pretrained`` in a fresh process, ``medfl finetune`` and ``medfl predict`` on the real
files. A fast federation runs in process (tests/inprocess.py + server.federation); the ``medfl run``
end to end one is slow-marked."""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from medmnist.evaluator import getAUC

from config import load_scenario
from inprocess import InProcessGrid
from medformer.data import get_info, load_split
from medformer.model import build_medformer, make_config
from medformer.pretext import PretextObjective, build_pretext_model
from medformer.predict import read_scores_csv
from server.checkpoint import load_latest
from server.federation import Federation, RunSettings
from simulations.cli import main

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "simulations" / "configs" / "quickstart.yaml"
FAST = ["model.preset=tiny", "training.rounds=2", "training.local_steps=2", "training.batch_size=32",
        "evaluation.max_train_examples=100"]
SITES = {7: {"dataset": "breastmnist", "name": "breast"}, 8: {"dataset": "pneumoniamnist", "name": "pneumonia"},
         9: {"dataset": "retinamnist", "name": "retina"}}

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def run(real_data_dir, tmp_path_factory):
    """A quickstart federation (tiny preset, 2 rounds) through the real ClientApp and ServerApp loop."""
    from deploy.payload import task_identity

    out = tmp_path_factory.mktemp("run") / "quickstart"
    scenario = load_scenario(QUICKSTART, FAST)
    with task_identity():
        grid = InProcessGrid({n: {**c, "data-dir": str(real_data_dir)} for n, c in SITES.items()})
        Federation(RunSettings(scenario=scenario, out_dir=out, data_dir=str(real_data_dir), expected_nodes=3,
                               progress=False)).run(grid)
    return out


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("export") / "model"
    assert main(["export", str(run), "--out", str(model_dir)]) == 0
    return model_dir


def _cli(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def _probe_images(real_data_dir) -> dict[str, torch.Tensor]:
    return {f: load_split(f, "test", data_dir=real_data_dir).batch(slice(0, 32))[0]
            for f in ("breastmnist", "pneumoniamnist", "retinamnist")}


EMBED_SCRIPT = """
import sys, numpy as np, torch
torch.set_num_threads(1)
import medformer
from medformer.data import load_split
model = medformer.load_pretrained(sys.argv[1])
out = {}
with torch.no_grad():
    for flag in ("breastmnist", "pneumoniamnist", "retinamnist"):
        x = load_split(flag, "test", data_dir=sys.argv[3]).batch(slice(0, 32))[0]
        out[flag] = model.embed(x, flag).numpy()
np.savez(sys.argv[2], **out)
"""


def test_export_loads_in_a_fresh_process_with_the_runs_exact_embeddings(run, exported, real_data_dir, tmp_path):
    # The run's final global weights, as the server checkpointed them.
    ckpt = load_latest(run / "checkpoints")
    scenario = load_scenario(QUICKSTART, FAST)
    model = build_pretext_model(make_config("tiny"), scenario.datasets(),
                                PretextObjective(scenario.pretext, mask_ratio=scenario.mask_ratio))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ckpt["arrays"].items()}, strict=True)
    model.eval()
    # A fresh Python process that only has the model folder (and medformer).
    env = {k: v for k, v in os.environ.items() if k != "MEDMNIST_DATA"}
    out = tmp_path / "emb.npz"
    proc = subprocess.run([sys.executable, "-c", EMBED_SCRIPT, str(exported), str(out), str(real_data_dir.resolve())],
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = np.load(out)
    with torch.no_grad():
        for flag, x in _probe_images(real_data_dir).items():
            ours = model.embed(x, flag).numpy()
            assert np.abs(ours - theirs[flag]).max() == 0.0, flag


def test_model_safetensors_holds_only_tensors(exported, run):
    from safetensors import safe_open

    raw = (exported / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    assert all(set(v) == {"dtype", "shape", "data_offsets"} for v in entries.values())
    assert 8 + n + max(v["data_offsets"][1] for v in entries.values()) == len(raw)  # nothing else in the file
    assert b"\x80\x02" not in raw[:2] and not raw.startswith(b"PK")  # neither a pickle nor torch's zip
    with safe_open(exported / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == set(load_latest(run / "checkpoints")["arrays"])


def test_config_and_card_describe_the_run(exported, run):
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((exported / "config.json").read_text())
    assert config["format"] == "medformer-fl model" and config["preset"] == "tiny"
    assert config["model"] == {**config["model"], "dim": 32, "depth": 1}
    assert [(d["flag"], d["size"], d["input_kind"]) for d in config["datasets"]] == [
        ("breastmnist", 28, "2d-1ch"), ("pneumoniamnist", 28, "2d-1ch"), ("retinamnist", 28, "2d-3ch")]
    assert set(config["scopes"]) >= {"body", "inputs.2d-1ch", "inputs.2d-3ch", "latents.breastmnist", "outputs.mae"}
    assert config["pretext"] == {"weights": {"mae": 1.0, "contrastive": 1.0}, "mask_ratio": 0.75}
    assert config["source"]["downstream"] == summary["downstream"]
    assert config["library"]["medformer-fl"] and config["library"]["torch"] == torch.__version__
    card = (exported / "README.md").read_text()
    # The card's downstream table is summary.json's, cell for cell.
    table = card.split("## Downstream evaluation", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    head, body = rows[0], rows[1:]
    assert {r[0] for r in body} == set(summary["downstream"])
    for r in body:
        for col, cell in zip(head[1:], r[1:]):
            method, metric = col.rsplit(" ", 1)
            assert cell == f"{summary['downstream'][r[0]][method][metric.lower()]:.4f}", (r[0], col)
    for site in ("breast", "pneumonia", "retina"):
        assert re.search(rf"\| {site} \| \w+ \|.*\| no DP \|", card), site
    assert "## Intended use" in card and "## Limits" in card and "3 site(s)" in card


@pytest.mark.parametrize("case, needle", [
    ("no-run", "is not a folder"), ("empty-run", "holds no checkpoints"), ("bad-round", "--round 9"),
    ("busy-out", "not an empty folder"),
])
def test_export_bad_input_is_exit_2_one_line_nothing_written(run, tmp_path, capsys, case, needle):
    out = tmp_path / "model"
    src = {"no-run": tmp_path / "nope", "empty-run": tmp_path, "bad-round": run, "busy-out": run}[case]
    extra = ["--round", "9"] if case == "bad-round" else []
    if case == "busy-out":
        out.mkdir()
        (out / "keep").write_text("x")
    code, err = _cli(["export", src, "--out", out, *extra], capsys)
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert (sorted(p.name for p in out.iterdir()) == ["keep"]) if case == "busy-out" else not out.exists()


def _official_test_labels(real_data_dir, flag: str) -> np.ndarray:
    with np.load(real_data_dir / f"{flag}.npz") as npz:  # straight from the official file
        return npz["test_labels"]


@pytest.mark.parametrize("probe", [False, True], ids=["fine-tune", "linear-probe"])
def test_finetune_then_predict_gives_the_reported_auc(exported, real_data_dir, tmp_path, capsys, probe):
    ft = tmp_path / "ft"
    args = ["finetune", exported, "--dataset", "breastmnist", "--data-dir", real_data_dir, "--out", ft,
            "--epochs", "2", "--no-progress", "--device", "cpu" if probe else "auto"]
    code, err = _cli([*args, *(["--linear-probe"] if probe else [])], capsys)
    assert code == 0, err
    metrics = json.loads((ft / "metrics.json").read_text())
    assert metrics["method"] == ("linear_probe" if probe else "fine_tune") and metrics["device"] == "cpu"
    assert 0 <= metrics["test"]["auc"] <= 1 and 0 <= metrics["test"]["acc"] <= 1 and metrics["n_train"] == 546
    assert metrics["fresh_head"] is (not probe) and metrics["new_parts"] == {}
    assert (ft / "report.md").read_text().startswith("# ") and "test" in (ft / "README.md").read_text()
    if not probe:
        assert any("a fresh head outputs.breastmnist" in line for line in err)
    csv = tmp_path / "preds.csv"
    code, err = _cli(["predict", ft, "--dataset", "breastmnist", "--split", "test", "--data-dir", real_data_dir,
                      "--out", csv, "--device", "cpu"], capsys)
    assert code == 0, err
    scores = read_scores_csv(csv)
    assert scores.shape == (156, 2)
    auc = getAUC(_official_test_labels(real_data_dir, "breastmnist"), scores, "binary-class")
    assert abs(auc - metrics["test"]["auc"]) <= 1e-6
    # medmnist.Evaluator's own reader sees the same table (index column, no header).
    import pandas as pd
    assert np.array_equal(pd.read_csv(csv, index_col=0, header=None).sort_index().values, scores)


def test_finetune_on_a_dataset_the_encoder_never_saw_says_what_is_new(exported, real_data_dir, tmp_path, capsys):
    ft = tmp_path / "adrenal"
    code, err = _cli(["finetune", exported, "--dataset", "adrenalmnist3d", "--data-dir", real_data_dir, "--out", ft,
                      "--epochs", "1", "--max-train-examples", "48", "--batch-size", "16", "--warmup", "0.2",
                      "--ema", "0.9", "--head-first", "0.25", "--no-progress"], capsys)
    assert code == 0, err
    said = " ".join(err)
    assert "adrenalmnist3d@28 is new to this encoder" in said and "inputs.3d-1ch" in said
    assert "latents.adrenalmnist3d" in said and "a fresh head outputs.adrenalmnist3d" in said
    metrics = json.loads((ft / "metrics.json").read_text())
    assert set(metrics["new_parts"]) >= {"inputs.3d-1ch", "latents.adrenalmnist3d"} and metrics["warmup"] == 0.2
    report = (ft / "report.md").read_text()
    assert metrics["ema"] == 0.9 and "weights averaged (EMA decay 0.9)" in report
    assert metrics["head_first"] == 0.25 and "head alone for the first 0.25 of the steps" in report
    code, err = _cli(["finetune", exported, "--dataset", "adrenalmnist3d", "--data-dir", real_data_dir,
                      "--out", tmp_path / "bad", "--warmup", "1", "--no-progress"], capsys)
    assert code != 0 and "--warmup 1.0 must be a share of the steps in [0, 1)" in " ".join(err)
    code, err = _cli(["finetune", exported, "--dataset", "adrenalmnist3d", "--data-dir", real_data_dir,
                      "--out", tmp_path / "bad", "--ema", "1", "--no-progress"], capsys)
    assert code != 0 and "--ema 1.0 must be a decay in [0, 1)" in " ".join(err)
    code, err = _cli(["finetune", exported, "--dataset", "adrenalmnist3d", "--data-dir", real_data_dir,
                      "--out", tmp_path / "bad", "--head-first", "-0.1", "--no-progress"], capsys)
    assert code != 0 and "--head-first -0.1 must be a share of the steps in [0, 1)" in " ".join(err)
    config = json.loads((ft / "config.json").read_text())
    assert ("adrenalmnist3d", 28) in [(d["flag"], d["size"]) for d in config["datasets"]]
    assert config["heads"] == {"adrenalmnist3d": {"kind": "task", "task": "binary-class", "num_outputs": 2}}
    # The pretrained 2D parts came through the fine-tune untouched (frozen off its path).
    from medformer import load_pretrained

    base, tuned = load_pretrained(exported).state_dict(), load_pretrained(ft).state_dict()
    assert all(torch.equal(base[k], tuned[k]) for k in base if k.startswith(("inputs.2d", "latents.breast")))


def test_predict_images_npz_and_bad_input(exported, real_data_dir, tmp_path, capsys):
    ft = tmp_path / "ft"
    assert _cli(["finetune", exported, "--dataset", "breastmnist", "--data-dir", real_data_dir, "--out", ft,
                 "--linear-probe", "--no-progress", "--max-train-examples", "100"], capsys)[0] == 0
    with np.load(real_data_dir / "breastmnist.npz") as npz:
        images = npz["test_images"][:10]
    np.savez(tmp_path / "mine.npz", images=images)
    split_csv, mine_csv = tmp_path / "split.csv", tmp_path / "mine.csv"
    assert _cli(["predict", ft, "--dataset", "breastmnist", "--split", "test", "--data-dir", real_data_dir,
                 "--out", split_csv], capsys)[0] == 0
    assert _cli(["predict", ft, "--dataset", "breastmnist", "--images", tmp_path / "mine.npz", "--out", mine_csv],
                capsys)[0] == 0
    assert np.array_equal(read_scores_csv(mine_csv), read_scores_csv(split_csv)[:10])
    np.savez(tmp_path / "rgb.npz", images=np.zeros((2, 28, 28, 3), np.uint8))
    bad = tmp_path / "bad.csv"
    for args, needle in [
        (["predict", exported, "--dataset", "breastmnist", "--split", "test", "--data-dir", real_data_dir],
         "no head for breastmnist"),
        (["predict", ft, "--dataset", "breastmnist", "--split", "test", "--images", tmp_path / "mine.npz"],
         "exactly one of --split"),
        (["predict", ft, "--dataset", "breastmnist", "--images", tmp_path / "rgb.npz"], "expected uint8 (N, 28, 28)"),
        (["predict", ft, "--dataset", "pneumoniamnist", "--split", "test", "--data-dir", real_data_dir],
         "no head for pneumoniamnist"),
        (["predict", tmp_path, "--dataset", "breastmnist", "--split", "test"], "no config.json"),
        (["finetune", exported, "--dataset", "nosuchmnist", "--out", tmp_path / "x"], "unknown MedMNIST dataset"),
        (["finetune", exported, "--dataset", "breastmnist", "--size", "32", "--out", tmp_path / "x"], "--size 32"),
    ]:
        code, err = _cli([*args, "--out", bad] if args[0] == "predict" else args, capsys)
        assert code == 2 and len(err) == 1 and needle in err[0], (args, err)
    assert not bad.exists() and not (tmp_path / "x").exists()


def test_load_pretrained_refuses_a_damaged_model(exported, tmp_path):
    import shutil

    from medformer import load_pretrained
    from medformer.pretrained import ModelDirError

    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    raw = bytearray((copy / "model.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ModelDirError, match="damaged or modified"):
        load_pretrained(copy)
    config = json.loads((exported / "config.json").read_text())
    config["model"]["no_such_field"] = 1
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="no_such_field"):
        load_pretrained(copy)


def test_heavy_imports_stay_out_of_the_core_path():
    code = ("import sys, medformer, medformer.pretrained, medformer.predict, medformer.train, client.app, server.app, "
            "simulations.cli; bad = [m for m in ('monai', 'nibabel', 'pydicom') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-c", "import sys, medformer.pretrained; assert 'flwr' not in sys.modules"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_medfl_run_then_export_then_load_end_to_end(real_data_dir, tmp_path, quickstart_run):
    out, model_dir = quickstart_run, tmp_path / "model"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", "export", str(out), "--out", str(model_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads((model_dir / "config.json").read_text())["source"]["downstream"] == summary["downstream"]
    emb = tmp_path / "emb.npz"
    proc = subprocess.run([sys.executable, "-c", EMBED_SCRIPT, str(model_dir), str(emb), str(real_data_dir.resolve())],
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = sorted((out / "checkpoints").glob("round-*.pt"))[-1]
    arrays = torch.load(last, weights_only=True)["arrays"]
    scenario = load_scenario(QUICKSTART, ["model.preset=tiny"])
    model = build_pretext_model(make_config("tiny"), scenario.datasets(), PretextObjective(scenario.pretext))
    model.load_state_dict(arrays, strict=True)
    model.eval()
    theirs = np.load(emb)
    torch.set_num_threads(1)
    with torch.no_grad():
        for flag, x in _probe_images(real_data_dir).items():
            assert np.abs(model.embed(x, flag).numpy() - theirs[flag]).max() == 0.0, flag
    assert get_info("breastmnist").task == "binary-class"


def test_pretext_tokenizers_and_heads_survive_export(tmp_path):
    """bridge gives a 3D-only model a 2D tokenizer, distill a head: both come back, exactly."""
    from medformer.pretrained import load_pretrained, save_pretrained

    pretext = {"weights": {"mae": 1.0, "bridge": 0.5, "distill": 0.5}, "mask_ratio": 0.75}
    torch.manual_seed(3)
    model = build_pretext_model(make_config("tiny"), [("adrenalmnist3d", 28)],
                                PretextObjective(pretext["weights"]))
    assert any(k.startswith("inputs.2d-1ch.") for k in model.state_dict())
    save_pretrained(model, tmp_path / "m", preset="tiny", pretext=pretext)
    loaded = load_pretrained(tmp_path / "m")
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_a_model_exported_with_a_renamed_field_still_loads(tmp_path):
    """``stem_depth`` became ``stem_depth_2d`` and ``stem_depth_3d``: a config.json written before
    loads into the same architecture and weights (the config is not covered by the weights' hash)."""
    from medformer.pretrained import load_pretrained, save_pretrained

    torch.manual_seed(4)
    model = build_medformer(make_config("medformer_tiny_deepconv49_fr3d"),
                            [("adrenalmnist3d", 28), ("breastmnist", 28)])
    save_pretrained(model, tmp_path / "m", preset="medformer_tiny_deepconv49_fr3d")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    fields = config["model"]
    fields["stem_depth"] = fields.pop("stem_depth_2d")
    del fields["stem_depth_3d"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.cfg == model.cfg
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_finetune_defaults_are_the_benchmarks_recipe():
    """`medfl finetune` without settings trains as the quality benchmark's validated recipe does."""
    from benchmarks.quality.experiment import PRESETS
    from medformer.eval import RECIPE, recipe_epochs
    from simulations.cli import build_parser

    full = PRESETS["full"]
    assert (full.fine_tune_batch, full.fine_tune_lr, full.fine_tune_encoder_lr, full.fine_tune_warmup,
            full.fine_tune_ema, full.fine_tune_head_first, full.fine_tune_epochs, full.min_steps) == (
        RECIPE["batch_size"], RECIPE["lr"], RECIPE["encoder_lr"], RECIPE["warmup"], RECIPE["ema"],
        RECIPE["head_first"], RECIPE["min_epochs"], RECIPE["min_steps"])
    args = build_parser().parse_args(["finetune", "m", "--dataset", "breastmnist"])
    assert (args.batch_size, args.lr, args.encoder_lr, args.warmup, args.ema, args.head_first, args.epochs) == (
        32, RECIPE["lr"], RECIPE["encoder_lr"], RECIPE["warmup"], RECIPE["ema"], RECIPE["head_first"], None)
    # BreastMNIST's 546 training images: 18 steps an epoch, so the 1200-step floor sets the epochs.
    assert recipe_epochs(546, 32, min_epochs=20, min_steps=1200) == 67 == full.fine_tune_epochs_for(546)
    assert recipe_epochs(4708, 32, min_epochs=20, min_steps=1200) == 20
