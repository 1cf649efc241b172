"""The house: imports run one way (simulations, deploy, benchmarks -> server, client -> config,
protocol -> medformer), and the benchmarks measure the product's own round, not a copy of it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OURS = ("config", "protocol", "medformer", "client", "server", "simulations", "deploy", "benchmarks", "tools")


def _imports(path: Path) -> set[str]:
    """Top-level module names a file imports (absolute imports; inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def _room(room: str) -> dict[str, set[str]]:
    files = [REPO / f"{room}.py"] if (REPO / f"{room}.py").exists() else sorted((REPO / room).rglob("*.py"))
    assert files, room
    return {str(f.relative_to(REPO)): _imports(f) for f in files}


# room -> what it may import of ours (besides itself)
ALLOWED = {
    "medformer": set(),
    "config": {"medformer"},
    "protocol": {"config", "medformer"},
    "client": {"config", "protocol", "medformer"},
    "server": {"config", "protocol", "medformer"},
    "tools": set(),
}


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_imports_run_one_way(room):
    bad = {f: sorted((mods & set(OURS)) - ALLOWED[room] - {room})
           for f, mods in _room(room).items() if (mods & set(OURS)) - ALLOWED[room] - {room}}
    assert not bad, f"{room} imports upward or sideways: {bad}"


def test_medformer_is_pure_pytorch():
    flwr = {f for f, mods in _room("medformer").items() if "flwr" in mods}
    assert not flwr, f"medformer must not import Flower: {sorted(flwr)}"


def test_nothing_imports_the_cli():
    users = {f: m for room in ("config", "protocol", "medformer", "client", "server", "deploy", "benchmarks", "tools")
             for f, m in _room(room).items() if "simulations" in m}
    assert not users, f"simulations/ is on top; nothing imports it: {sorted(users)}"


def test_quality_benchmark_runs_the_products_round(real_data_dir, monkeypatch, tmp_path):
    """Its pretraining calls client.round.train_round for every site and round and aggregates with
    server.rounds.Aggregator; its own modules hold no backward pass, optimizer step or mean."""
    import benchmarks.quality.experiment as experiment
    from server.rounds import Aggregator

    for f in (REPO / "benchmarks" / "quality").glob("*.py"):
        if f.name == "plan.py":  # counts the FLOPs of one step (FlopCounterMode); trains nothing
            continue
        text = f.read_text()
        for needle in (".backward(", "optimizer.step(", "keyed_mean(", "train_local("):
            assert needle not in text, f"{f.name} has its own {needle}"
    calls = {"train_round": 0, "combine": 0}
    real_round, real_combine = experiment.train_round, Aggregator.combine

    def counted_round(*a, **k):
        calls["train_round"] += 1
        return real_round(*a, **k)

    def counted_combine(self, *a, **k):
        calls["combine"] += 1
        return real_combine(self, *a, **k)

    monkeypatch.setattr(experiment, "train_round", counted_round)
    monkeypatch.setattr(Aggregator, "combine", counted_combine)
    preset = experiment.Preset(sets=("model.preset=tiny", "training.rounds=2", "training.local_steps=1",
                                     "training.batch_size=16"))
    exp = experiment.Experiment("test", preset, ["breastmnist", "retinamnist"], str(real_data_dir), tmp_path)
    pre = exp.pretrained("federated", 0)
    assert calls == {"train_round": 2 * 2, "combine": 2}
    assert set(pre.states) == {"breastmnist", "retinamnist"}
