"""A site's own privacy: its node-config policy beats the server's request, its ledger lives on its own
disk and survives a restart, its DP noise cannot be replayed by the server, and a deployed ClientApp
obeys no injected fault. Everything runs the real ClientApp in process (tests/inprocess.py)."""
from __future__ import annotations

import json
import re
import stat

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from client.policy import LedgerStore, PolicyRefusal, SitePolicy, settle_privacy
from client.round import train_round
from client.site import SiteConfigError
from client.site import site_from_node_config as identity_from_node_config
from config import FaultSpec, ModelSpec, PrivacySpec, Site, TrainingSpec, load_scenario
from inprocess import InProcessGrid
from medformer.model import make_config
from medformer.pretext import PretextObjective, build_pretext_model
from medformer.dp.accounting import epsilon_of
from protocol import ARRAYS, CONFIG, INSTRUCTIONS, METRICS, PRIVACY, REFUSAL, RoundInstructions
from server.checkpoint import load_latest
from server.federation import Federation, RunSettings

pytestmark = [pytest.mark.usefixtures("flower_task_identity", "one_torch_thread"),
              pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")]

QUICKSTART = "simulations/configs/quickstart.yaml"
FAST = ["model.preset=tiny", "training.rounds=2", "training.local_steps=3", "training.batch_size=64",
        "evaluation.linear_probe=false", "pretext={mae: 1.0, rotation: 0.5}"]
OBJ = PretextObjective({"mae": 1.0, "rotation": 0.5})
PLAN = dict(num_examples=546, batch_size=64, steps_per_round=3, rounds=2)


# ---- the policy itself ------------------------------------------------------------------------------

@pytest.mark.parametrize("node_config, needle", [
    ({"dataset": "breastmnist", "max-epsilon": -1}, "max-epsilon=-1"),
    ({"dataset": "breastmnist", "max-epsilon": "8"}, "max-epsilon='8'"),
    ({"dataset": "breastmnist", "delta": 1.0}, "delta=1.0"),
    ({"dataset": "breastmnist", "require-dp": "yes"}, "require-dp='yes'"),
    ({"dataset": "breastmnist", "state-dir": "relative/dir"}, "state-dir='relative/dir'"),
    ({"dataset": "breastmnist", "max-epsilion": 8}, "did you mean 'max-epsilon'"),
])
def test_bad_policy_keys_are_refused_naming_the_key(node_config, needle):
    with pytest.raises((SiteConfigError, ValueError), match=re.escape(needle)):
        identity_from_node_config(node_config)
        SitePolicy.from_node_config(node_config)


def _eps(plan) -> float:
    return epsilon_of([(plan.noise_multiplier, plan.sample_rate, plan.total_steps)], delta=plan.delta,
                      accountant=plan.accountant)


def test_the_site_tightens_every_weaker_request():
    policy = SitePolicy(max_epsilon=8.0, delta=1e-5, max_grad_norm=0.5)
    plan, notes = settle_privacy({"target_epsilon": 50.0, "target_delta": 1e-3, "max_grad_norm": 2.0}, policy, **PLAN)
    assert plan.target_epsilon == 8.0 and plan.delta == 1e-5 and plan.max_grad_norm == 0.5
    assert 7.9 <= _eps(plan) <= 8.0
    assert any("50" in n for n in notes) and any("delta" in n for n in notes) and any("max-grad-norm" in n for n in notes)
    # no DP asked: the site trains at its own budget
    plan, notes = settle_privacy(None, policy, **PLAN)
    assert plan.target_epsilon == 8.0 and "no DP" in notes[0]
    # a noise multiplier too small for the budget is recalibrated
    plan, notes = settle_privacy({"noise_multiplier": 0.3}, policy, **PLAN)
    assert plan.target_epsilon == 8.0 and plan.noise_multiplier > 0.3 and any("recalibrated" in n for n in notes)
    # a stronger request is kept as it is
    plan, notes = settle_privacy({"target_epsilon": 2.0, "target_delta": 1e-7, "max_grad_norm": 0.2}, policy, **PLAN)
    assert plan.target_epsilon == 2.0 and plan.delta == 1e-7 and plan.max_grad_norm == 0.2 and notes == []
    # require-dp without a budget of its own: a round without DP is refused
    with pytest.raises(PolicyRefusal, match="requires DP-SGD"):
        settle_privacy(None, SitePolicy(require_dp=True), **PLAN)
    assert settle_privacy(None, SitePolicy(), **PLAN) == (None, [])


# ---- one site's rounds, through the real ClientApp --------------------------------------------------

def _train_message(node_id: int, rnd: int, *, privacy: dict | None, rounds: int = 2, privacy_state: str | None = None,
                   fault: dict | None = None, objective: PretextObjective = OBJ):
    model = build_pretext_model(make_config("tiny"), [("breastmnist", 28)], objective)
    torch.manual_seed(0)
    sent = ArrayRecord(array_dict={k: Array(v.detach().numpy().copy()) for k, v in model.state_dict().items()})
    ins = RoundInstructions(
        round=rnd, seed=0, site=Site("breast", "breastmnist", 28), model=ModelSpec(preset="tiny"),
        pretext=dict(objective.weights), mask_ratio=0.75,
        training=TrainingSpec(rounds=rounds, batch_size=64, local_epochs=1.0, local_steps=3, lr=1e-3,
                              weight_decay=0.0, optimizer="adamw"),
        privacy=PrivacySpec(**privacy) if privacy else None, privacy_state=privacy_state,
        fault=FaultSpec(hospital="breast", **fault) if fault else None)
    return Message(content=RecordDict({ARRAYS: sent, CONFIG: ConfigRecord({INSTRUCTIONS: ins.to_json()})}),
                   message_type=MessageType.TRAIN, dst_node_id=node_id)


def test_a_restarted_supernode_keeps_counting_from_its_own_ledger(real_data_dir, tmp_path):
    state_dir = tmp_path / "site-state"
    node = {"name": "breast", "dataset": "breastmnist", "data-dir": str(real_data_dir), "max-epsilon": 8.0,
            "state-dir": str(state_dir)}
    grid = InProcessGrid({7: node})
    asked = {"target_epsilon": 50.0}  # the server asks for far less privacy than the site allows
    [r1] = grid.send_and_receive([_train_message(7, 1, privacy=asked)])
    p1 = r1.content[PRIVACY]
    assert p1["steps"] == 3 and p1["epsilon"] < 8.0 and "max-epsilon 8" in p1["site-policy"]
    ledger = state_dir / "privacy-ledger-breast.json"
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o600
    assert sum(h[2] for h in json.loads(ledger.read_text())["runs"]["1"]["history"]) == 3

    grid.restart(7)  # a new SuperNode process: context.state is gone
    # ...and the server "forgets" round 1 (sends no history): the site's own ledger still counts it
    [r2] = grid.send_and_receive([_train_message(7, 2, privacy=asked, privacy_state=None)])
    p2 = r2.content[PRIVACY]
    assert p2["steps"] == 6 and 7.9 <= p2["epsilon"] <= 8.0
    assert p2["epsilon"] == pytest.approx(epsilon_of(json.loads(p2["state"])["history"], delta=p2["delta"],
                                                     accountant="rdp"), rel=1e-9)
    # a third round, beyond the two the budget was planned for, would overspend: refused, with the reason
    grid.restart(7)
    [r3] = grid.send_and_receive([_train_message(7, 3, privacy=asked, privacy_state='{"history": []}')])
    assert "privacy budget exhausted" in r3.content[REFUSAL]["reason"]
    assert len(r3.content[ARRAYS]) == 0 and r3.content[PRIVACY]["steps"] == 6
    # a new run on the same records is refused once the site's lifetime budget is spent
    again = InProcessGrid({7: node}, run_id=2)
    [r4] = again.send_and_receive([_train_message(7, 1, privacy=asked)])
    assert "lifetime epsilon" in r4.content[REFUSAL]["reason"]


def test_a_site_that_requires_dp_refuses_a_batch_coupled_pretext(real_data_dir, tmp_path):
    """The quickstart's contrastive recipe at a site whose policy imposes DP: refused before any budget
    is reserved or any weight leaves, with the reason in the reply."""
    state_dir = tmp_path / "site-state"
    grid = InProcessGrid({7: {"name": "breast", "dataset": "breastmnist", "data-dir": str(real_data_dir),
                              "max-epsilon": 8.0, "state-dir": str(state_dir)}})
    contrastive = PretextObjective({"mae": 1.0, "contrastive": 1.0})
    [reply] = grid.send_and_receive([_train_message(7, 1, privacy=None, objective=contrastive)])
    reason = reply.content[REFUSAL]["reason"]
    assert "contrastive" in reason and "per-sample" in reason, reason
    assert len(reply.content[ARRAYS]) == 0 and not (state_dir / "privacy-ledger-breast.json").exists()


def test_a_private_reply_carries_no_unnoised_data_scalars(real_data_dir):
    grid = InProcessGrid({7: {"dataset": "breastmnist", "data-dir": str(real_data_dir), "name": "breast"}})
    [private] = grid.send_and_receive([_train_message(7, 1, privacy={"noise_multiplier": 1.0})])
    assert set(private.content[METRICS].keys()) == {"num-examples", "steps"}
    [plain] = grid.send_and_receive([_train_message(7, 1, privacy=None)])
    assert {"loss", "images-per-second", "seconds"} <= set(plain.content[METRICS].keys())


def test_a_deployed_clientapp_ignores_injected_faults(real_data_dir):
    from client.app import app
    from client.faults import InjectedFault, chaos_app

    assert not app._mods
    node = {7: {"dataset": "breastmnist", "data-dir": str(real_data_dir), "name": "breast"}}
    order = {"kind": "raise"}
    [reply] = InProcessGrid(node).send_and_receive([_train_message(7, 1, privacy=None, fault=order)])
    assert not reply.has_error() and len(reply.content[ARRAYS]) > 0
    [chaos] = InProcessGrid(node, client_app=chaos_app).send_and_receive([_train_message(7, 1, privacy=None,
                                                                                         fault=order)])
    assert chaos.has_error() and InjectedFault.__name__ in chaos.error.reason


# ---- what the server knows does not replay a private round ------------------------------------------

def test_replaying_a_private_round_with_everything_the_server_knows_fails(real_data_dir):
    """Scenario seed, site name, round and received weights are all the same: a DP round's release
    differs between two replays (the noise and the batches are secret); a non-DP round does not."""
    received = {k: v.clone() for k, v in build_pretext_model(make_config("tiny"), [("breastmnist", 28)], OBJ)
                .state_dict().items()}
    site = Site("breast", "breastmnist", 28, data_dir=str(real_data_dir))

    def release(privacy):
        ins = RoundInstructions.from_json(str(_train_message(7, 1, privacy=privacy).content[CONFIG][INSTRUCTIONS]))
        out = train_round(ins, site, {k: v.clone() for k, v in received.items()}, ledger_state=None,
                          optimizer_state=None)
        return torch.cat([v.flatten() for v in out.trained.values()])

    dp = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
    a, b = release(dp), release(dp)
    assert (a - b).abs().max() > 1e-3, "the server replayed the site's DP noise"
    assert torch.equal(release(None), release(None))


BREAST = {"dataset": "breastmnist", "name": "breast"}
RETINA_AT_8 = {"dataset": "retinamnist", "name": "retina", "max-epsilon": 8.0}


def _federation(tmp_path, real_data_dir, name: str, sets: list[str], nodes: dict[int, dict], **grid_kw):
    scenario = load_scenario(QUICKSTART, [*FAST, *sets])
    grid = InProcessGrid({n: {**c, "data-dir": str(real_data_dir)} for n, c in nodes.items()}, **grid_kw)
    settings = RunSettings(scenario=scenario, out_dir=tmp_path / name, data_dir=str(real_data_dir),
                           expected_nodes=len(nodes), progress=False)
    summary = Federation(settings).run(grid)
    return summary, load_latest(tmp_path / name / "checkpoints")["arrays"]


def test_dp_runs_with_one_seed_differ_and_non_dp_runs_are_identical(real_data_dir, tmp_path):
    asked, sites = ["privacy={target_epsilon: 50}"], {7: BREAST, 8: RETINA_AT_8}
    s1, w1 = _federation(tmp_path, real_data_dir, "dp-1", asked, sites)
    s2, w2 = _federation(tmp_path, real_data_dir, "dp-2", asked, sites)
    assert any(not np.array_equal(w1[k], w2[k]) for k in w1)
    # the site with its own max-epsilon 8 trained at 8; the other at the server's 50: each its own figure
    retina, breast = s1["clients"]["retina"], s1["clients"]["breast"]
    assert 7.0 < retina["epsilon"] <= 8.0 and "max-epsilon 8" in retina["site_policy"]
    assert 8.0 < breast["epsilon"] <= 50.0 and "site_policy" not in breast
    for c in (retina, breast):
        assert c["epsilon"] == pytest.approx(epsilon_of([(c["noise_multiplier"], c["sample_rate"], c["steps"])],
                                                        delta=c["delta"], accountant=c["accountant"]), rel=0.01)
    # no DP asked: the site with a policy still trains privately, the other does not
    n1, _ = _federation(tmp_path, real_data_dir, "mixed", [], sites)
    assert n1["clients"]["breast"]["epsilon"] is None and 7.0 < n1["clients"]["retina"]["epsilon"] <= 8.0
    # without DP anywhere the seed fixes the whole run, bit for bit
    _, v1 = _federation(tmp_path, real_data_dir, "plain-1", [], {7: BREAST})
    _, v2 = _federation(tmp_path, real_data_dir, "plain-2", [], {7: BREAST})
    assert all(np.array_equal(v1[k], v2[k]) for k in v1)


def test_a_late_replys_privacy_spend_is_recorded(real_data_dir, tmp_path):
    """Retina answers after every round's timeout: it is dropped each round, but what it spent is in the
    summary (pulled by message id later), and its late weights are never averaged."""
    sets = ["privacy={noise_multiplier: 1.0}", "strategy.round_timeout=2", "strategy.min_train_nodes=1"]
    summary, _ = _federation(tmp_path, real_data_dir, "late", sets, {7: BREAST, 8: RETINA_AT_8}, late={8: 3.5})
    retina = summary["clients"]["retina"]
    assert retina.get("rounds_trained", 0) == 0
    assert [d["round"] for d in summary["dropouts"] if d["site"] == "retina"] == [1, 2]
    assert retina["steps"] == 2 * 3 and 0 < retina["epsilon"] <= 8.0  # both rounds' spend, the last one too
    assert summary["clients"]["breast"]["steps"] == 2 * 3


def test_ledger_store_round_trip_and_damage(tmp_path):
    store = LedgerStore(tmp_path, "breast")
    assert store.history(1) is None and store.other_runs(1) == []
    store.save(1, [(1.0, 0.1, 5)], delta=1e-5, accountant="rdp")
    store.save(2, [(2.0, 0.1, 3)], delta=1e-5, accountant="rdp")
    assert store.history(1) == [[1.0, 0.1, 5]] and store.other_runs(1) == [[2.0, 0.1, 3]]
    assert [p.name for p in tmp_path.iterdir()] == ["privacy-ledger-breast.json"]  # no temporary file left
    store.path.write_text("{not json")
    with pytest.raises(PolicyRefusal, match="unreadable"):
        store.history(1)
