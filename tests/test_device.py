"""Device selection: ``device: auto|cpu|cuda[:N]`` in scenarios, a site's node-config and ``--device`` on the
commands. On a CPU machine ``auto`` is the CPU and everything runs; the tests marked for CUDA run a DP round
(ghost clipping and Opacus hooks) and a fine-tune on the GPU where ``torch.cuda.is_available()``, and are
skipped elsewhere."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from client.round import train_round
from client.site import SiteConfigError, site_from_node_config
from config import ModelSpec, PrivacySpec, ScenarioError, Site, TrainingSpec, load_scenario
from medformer.data import load_split
from medformer.device import DeviceError, resolve_device, to_cpu
from medformer.model import make_config
from medformer.pretext import PretextObjective, build_pretext_model
from medformer.pretrained import save_pretrained
from medformer.train import noise_generator
from protocol import RoundInstructions
from server.instructions import Instructor
from simulations.cli import gpus_per_client, main

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False here)")
no_cuda = pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
QUICKSTART = "simulations/configs/quickstart.yaml"
OBJ = {"mae": 1.0, "rotation": 0.5}

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if CUDA else torch.device("cpu"))
    assert resolve_device(None) == resolve_device("auto")
    for bad in ("gpu", "cuda:x", "CPU", "cuda:-1"):
        with pytest.raises(DeviceError, match="is not one of auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    if CUDA:
        with pytest.raises(DeviceError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count() + 3}")


@no_cuda
def test_cuda_is_refused_where_there_is_none(tmp_path, capsys, real_data_dir):
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda")
    out = tmp_path / "out"
    code = main(["run", QUICKSTART, "--data-dir", str(real_data_dir), "--out", str(out), "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "CUDA is not available" in err[0] and not out.exists()


def test_scenario_and_node_config_take_a_device():
    assert load_scenario(QUICKSTART).device == "auto"
    assert load_scenario(QUICKSTART, ["device=cuda:1"]).device == "cuda:1"
    with pytest.raises(ScenarioError, match=r"^device: 'gpu' is not a device"):
        load_scenario(QUICKSTART, ["device=gpu"])
    sc = load_scenario(QUICKSTART, ["device=cpu"])
    site = sc.clients()[0]
    assert Instructor(sc, data_dir=None, privacy_states={})(site, 1).device == "cpu"
    with pytest.raises(SiteConfigError, match="node-config device='tpu'"):
        site_from_node_config({"dataset": "breastmnist", "device": "tpu"})
    assert site_from_node_config({"dataset": "breastmnist", "device": "cuda"}).dataset == "breastmnist"


def test_simulation_gives_each_clientapp_a_gpu_share_only_on_a_gpu():
    sc = load_scenario(QUICKSTART)
    assert gpus_per_client(sc, torch.device("cpu"), 3) == 0.0
    share = gpus_per_client(sc, torch.device("cuda", 0), 3)
    assert 1 / 3 <= share <= 1.0
    assert gpus_per_client(load_scenario(QUICKSTART, ["simulation.gpus_per_client=0.25"]), torch.device("cuda", 0), 3) == 0.25


def test_batches_follow_the_device_and_dp_noise_draws_where_the_model_is(real_data_dir):
    split = load_split("breastmnist", "train", data_dir=real_data_dir)
    x, y = split.batch(np.arange(8), device="cpu")
    x0, y0 = split.batch(np.arange(8))
    assert torch.equal(x, x0) and torch.equal(y, y0) and x.device.type == "cpu"
    secret = torch.Generator().manual_seed(1)
    assert noise_generator(secret, torch.device("cpu"), seeded=True) is secret  # on the CPU: the one secret source
    if CUDA:
        g = noise_generator(secret, torch.device("cuda", 0), seeded=False)
        assert g.device.type == "cuda"


def _instructions(real_data_dir, device: str, clipping: str, *, dp: bool = True) -> tuple[RoundInstructions, Site]:
    site = Site("breast", "breastmnist", data_dir=str(real_data_dir))
    ins = RoundInstructions(
        round=1, seed=0, site=site, model=ModelSpec(preset="tiny"), pretext=OBJ, mask_ratio=0.75,
        training=TrainingSpec(rounds=2, local_steps=2, batch_size=32, dp_clipping=clipping),
        privacy=PrivacySpec(noise_multiplier=1.0) if dp else None, data_dir=str(real_data_dir), device=device)
    return ins, site


def _round(real_data_dir, device: str, clipping: str):
    ins, site = _instructions(real_data_dir, device, clipping)
    torch.manual_seed(0)
    model = build_pretext_model(make_config("tiny"), [("breastmnist", 28)], PretextObjective(OBJ))
    received = {k: v.clone() for k, v in model.state_dict().items()}
    out = train_round(ins, site, received, ledger_state=None, optimizer_state=None)
    assert out.refusal is None and out.ledger is not None and out.ledger.steps == 2
    assert set(out.trained) == set(received)
    assert all(v.device.type == "cpu" and torch.isfinite(v).all() for v in out.trained.values())
    assert any(not torch.equal(out.trained[k], received[k]) for k in received)
    return out


@pytest.mark.parametrize("clipping", ["ghost", "hooks"])
def test_a_dp_round_on_the_cpu(real_data_dir, clipping):
    _round(real_data_dir, "cpu", clipping)


def _tiny_export(tmp_path) -> str:
    torch.manual_seed(0)
    model = build_pretext_model(make_config("tiny"), [("breastmnist", 28)], PretextObjective(OBJ))
    return str(save_pretrained(model, tmp_path / "model", preset="tiny", pretext={"weights": OBJ, "mask_ratio": 0.75},
                               card="# test model\n"))


def _finetune_and_predict(tmp_path, real_data_dir, device: str) -> dict:
    model = _tiny_export(tmp_path)
    ft, csv = tmp_path / "ft", tmp_path / "preds.csv"
    assert main(["finetune", model, "--dataset", "breastmnist", "--data-dir", str(real_data_dir), "--epochs", "1",
                 "--out", str(ft), "--device", device, "--no-progress"]) == 0
    metrics = json.loads((ft / "metrics.json").read_text())
    assert metrics["device"] == str(resolve_device(device))
    assert main(["predict", str(ft), "--dataset", "breastmnist", "--split", "test", "--data-dir", str(real_data_dir),
                 "--out", str(csv), "--device", device]) == 0
    from medmnist.evaluator import getAUC

    from medformer.predict import read_scores_csv

    labels = load_split("breastmnist", "test", data_dir=real_data_dir).labels
    assert abs(getAUC(labels, read_scores_csv(csv), "binary-class") - metrics["auc"]) <= 1e-6
    return metrics


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_finetune_and_predict_with_device_cpu_and_auto(tmp_path, real_data_dir, device):
    _finetune_and_predict(tmp_path, real_data_dir, device)


@needs_cuda
@pytest.mark.parametrize("clipping", ["ghost", "hooks"])
def test_cuda_dp_round(real_data_dir, clipping):
    """DP-SGD on the GPU: the model, the batches, ghost clipping or Opacus's hooks and the noise (from a
    secret generator on the GPU) all there; the Poisson batches from the CPU's secret generator."""
    out = _round(real_data_dir, "cuda", clipping)
    assert out.plan.noise_multiplier == 1.0


@needs_cuda
def test_cuda_finetune_and_predict(tmp_path, real_data_dir):
    assert _finetune_and_predict(tmp_path, real_data_dir, "cuda")["device"] == "cuda:0"


@needs_cuda
def test_cuda_load_pretrained_gives_the_cpu_embeddings(tmp_path, real_data_dir):
    from medformer import load_pretrained

    model = _tiny_export(tmp_path)
    x = load_split("breastmnist", "test", data_dir=real_data_dir).batch(slice(0, 16))[0]
    with torch.no_grad():
        cpu = load_pretrained(model).embed(x, "breastmnist")
        gpu = load_pretrained(model, device="cuda").embed(x.cuda(), "breastmnist").cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4)
    assert dataclasses.is_dataclass(make_config("tiny")) and to_cpu({"a": [x.cuda()]})["a"][0].device.type == "cpu"
