"""Tests for medformer.dp.accounting and the DP-SGD path of medformer.train.

What they pin down: the noise is calibrated for the whole federation; the epsilon a hospital reports
is the composition of every step it took (checked against a fresh Opacus accountant, across rounds
and through a JSON round trip); per-sample clipping and Gaussian noise are really applied at the
planned scale; and DP-SGD without noise or clipping is exactly the plain optimizer step; all of it
with both per-sample clipping paths (ghost, the default, and Opacus hooks).
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from medformer import train as training
from medformer.dp.optimizer import make_dp_sgd
from medformer.data import load_split
from synthetic import write_synthetic_npz
from medformer.model import make_config
from medformer.pretext import MaskedReconstruction, PretextObjective, build_pretext_model, patchify
from medformer.dp.accounting import PrivacyLedger, epsilon_of, plan_dp
from medformer.train import TrainingSpec, make_optimizer, train_local

FLAG = "breastmnist"
FRESH = {"rdp": RDPAccountant, "prv": PRVAccountant}


# Harmless warnings: Opacus hooks on modules whose inputs need no grad, vmap over CPU attention,
# RDP orders at the edge of their range for extreme (test-only) budgets.
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
              pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
              pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")]




@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """64 synthetic BreastMNIST training images in the official format."""
    folder = tmp_path_factory.mktemp("medmnist")
    write_synthetic_npz(folder, FLAG, n_train=64, n_val=4, n_test=4, seed=0)
    return load_split(FLAG, "train", data_dir=folder, verify=False)


def _model(objective: PretextObjective, seed: int = 0):
    torch.manual_seed(seed)
    return build_pretext_model(make_config("tiny"), [FLAG], objective)


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class _ImageKeyedMAE(MaskedReconstruction):
    """MAE whose mask depends only on each image, not on the RNG: chunking cannot change it."""

    def losses(self, model, x, dataset, generator=None):
        patch = model.tokenizer(dataset, x.shape[-1]).patch
        return self.masked_losses(model, x, dataset, patchify(x, patch).mean(-1))


def _image_keyed_objective() -> PretextObjective:
    objective = PretextObjective({"mae": 1.0})
    objective.tasks["mae"] = _ImageKeyedMAE()
    return objective


# --------------------------------------------------------------------------------------------------
# Calibration and accounting
# --------------------------------------------------------------------------------------------------
ROUNDS, STEPS_PER_ROUND, BATCH = 3, 4, 16


@pytest.fixture(scope="module")
def plans(data):
    """Plans for the synthetic hospital (64 records, q = 1/4, 3 rounds x 4 steps, epsilon 8), by accountant."""
    cache = {}

    def get(accountant: str):
        if accountant not in cache:
            cache[accountant] = plan_dp(num_examples=len(data), batch_size=BATCH, steps_per_round=STEPS_PER_ROUND,
                                        rounds=ROUNDS, target_epsilon=8.0, accountant=accountant)
        return cache[accountant]

    return get


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_plan_dp_calibrates_for_the_whole_federation(plans, accountant: str) -> None:
    plan = plans(accountant)
    assert plan.total_steps == ROUNDS * STEPS_PER_ROUND and plan.sample_rate == pytest.approx(0.25)
    assert plan.delta == pytest.approx(1 / 640) and plan.accountant == accountant
    eps = epsilon_of([(plan.noise_multiplier, plan.sample_rate, plan.total_steps)], delta=plan.delta,
                     accountant=accountant)
    assert 0.95 * 8.0 <= eps <= 8.0


def test_more_rounds_need_more_noise() -> None:
    common = dict(num_examples=1000, batch_size=50, steps_per_round=20, target_epsilon=8.0)
    one, ten = plan_dp(rounds=1, **common), plan_dp(rounds=10, **common)
    assert ten.noise_multiplier > one.noise_multiplier
    # A one-round plan run for ten rounds would overspend the budget.
    assert epsilon_of([(one.noise_multiplier, one.sample_rate, ten.total_steps)], delta=one.delta,
                      accountant="rdp") > 8.0 * 1.5


def test_plan_dp_rejects_bad_requests() -> None:
    base = dict(num_examples=100, batch_size=10, steps_per_round=5, rounds=2)
    with pytest.raises(ValueError, match="exactly one of target_epsilon and noise_multiplier"):
        plan_dp(**base)
    with pytest.raises(ValueError, match="exactly one of target_epsilon and noise_multiplier"):
        plan_dp(target_epsilon=1.0, noise_multiplier=1.0, **base)
    with pytest.raises(ValueError, match="noise_multiplier must be >= 0"):
        plan_dp(noise_multiplier=-1.0, **base)
    with pytest.raises(ValueError, match="max_grad_norm > 0"):
        plan_dp(noise_multiplier=1.0, max_grad_norm=0.0, **base)
    with pytest.raises(ValueError, match="unknown accountant 'gdp'; choose from rdp, prv"):
        plan_dp(noise_multiplier=1.0, accountant="gdp", **base)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        plan_dp(noise_multiplier=1.0, delta=1.0, **base)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noiseless_steps_have_infinite_epsilon(accountant: str) -> None:
    assert epsilon_of([(0.0, 0.5, 3)], delta=1e-5, accountant=accountant) == math.inf
    assert epsilon_of([], delta=1e-5, accountant=accountant) == 0.0


def _fresh_epsilon(accountant: str, plan, steps: int) -> float:
    """Independent recomputation: a new Opacus accountant stepped once per DP-SGD step."""
    acc = FRESH[accountant]()
    for _ in range(steps):
        acc.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
    return float(acc.get_epsilon(delta=plan.delta))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_ledger_counts_every_round_and_survives_json(data, plans, accountant: str) -> None:
    rounds, steps_per_round = ROUNDS, STEPS_PER_ROUND
    spec = TrainingSpec(batch_size=BATCH, local_steps=steps_per_round, lr=1e-3)
    plan = plans(accountant)
    objective = PretextObjective({"mae": 1.0, "rotation": 0.5})
    model = _model(objective)
    gen = torch.Generator().manual_seed(0)
    state = None  # what a ClientApp keeps in context.state between rounds
    for r in range(1, rounds + 1):
        ledger = PrivacyLedger.from_json(plan, state)  # resume: a fresh object every round
        assert ledger.steps == (r - 1) * steps_per_round
        assert ledger.can_afford(steps_per_round), f"round {r} is within the plan"
        result, _ = train_local(model, objective, data, FLAG, spec, generator=gen, ledger=ledger)
        assert ledger.steps == r * steps_per_round
        expected = _fresh_epsilon(accountant, plan, ledger.steps)
        assert result.epsilon == pytest.approx(expected, rel=0.01)
        assert result.epsilon <= 8.0
        state = ledger.to_json()
    final = PrivacyLedger.from_json(plan, state)
    assert final.epsilon() == pytest.approx(_fresh_epsilon(accountant, plan, plan.total_steps), rel=0.01)
    assert 0.95 * 8.0 <= final.epsilon() <= 8.0
    assert not final.can_afford(steps_per_round), "one round past the plan must be refused"
    # Forgetting the history (a new accountant every round) would report far less.
    assert PrivacyLedger(plan).epsilon_after(steps_per_round) < 0.7 * final.epsilon()


@pytest.mark.parametrize("clipping", ["ghost", "hooks"])
def test_empty_poisson_batches_take_a_noise_only_step(data, monkeypatch, clipping: str) -> None:
    """At rate 1/64 many batches are empty, some right after a non-empty one."""
    sizes: list[int] = []
    original = training._poisson_batches

    def spy(*args):
        for idx, y in original(*args):
            sizes.append(len(idx))
            yield idx, y

    monkeypatch.setattr(training, "_poisson_batches", spy)
    objective = PretextObjective({"mae": 1.0})
    model = _model(objective)
    spec = TrainingSpec(batch_size=1, local_steps=20, optimizer="sgd", lr=1e-3, weight_decay=0.0,
                          dp_clipping=clipping)
    plan = plan_dp(num_examples=len(data), batch_size=1, steps_per_round=20, rounds=1, noise_multiplier=1.0)
    ledger = PrivacyLedger(plan)
    result, _ = train_local(model, objective, data, FLAG, spec, generator=torch.Generator().manual_seed(0),
                            secret_generator=torch.Generator().manual_seed(0), ledger=ledger)
    assert any(a > 0 and b == 0 for a, b in zip(sizes, sizes[1:])), sizes
    assert ledger.steps == 20 and math.isfinite(result.epsilon)
    assert torch.isfinite(_weights(model)).all()


# --------------------------------------------------------------------------------------------------
# Clipping and noise, one DP-SGD step built from the pieces train_local uses
# --------------------------------------------------------------------------------------------------
def _step(model, objective, x, *, dp: bool, noise: float = 0.0, clip: float = 1e6, lr: float = 0.1,
          mask_seed: int = 0, noise_seed: int = 0, clipping: str = "ghost") -> torch.Tensor:
    """One optimizer step on the fixed batch x (SGD, no weight decay); returns the weight change."""
    before = _weights(model).clone()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, TrainingSpec(optimizer="sgd", lr=lr, weight_decay=0.0))
    clipper = None
    if dp:
        optimizer, clipper = make_dp_sgd(
            model, optimizer, clipping=clipping, noise_multiplier=noise, max_grad_norm=clip,
            expected_batch_size=x.shape[0], generator=torch.Generator().manual_seed(noise_seed))
    try:
        optimizer.zero_grad(set_to_none=True)
        with clipper.recording() if clipper is not None else contextlib.nullcontext():
            loss, _ = objective(model, x, FLAG, torch.Generator().manual_seed(mask_seed))
        clipper.backward(loss) if clipper is not None else loss.backward()
        optimizer.step()
    finally:
        if clipper is not None:
            clipper.close()
            for p in model.parameters():
                for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample"):
                    if hasattr(p, attr):
                        delattr(p, attr)
    return _weights(model) - before


def _batch(data, b: int = 16) -> torch.Tensor:
    return data.batch(np.arange(b))[0]


CLIPPING = pytest.mark.parametrize("clipping", ["ghost", "hooks"])


@CLIPPING
def test_dp_step_without_noise_or_clipping_is_plain_sgd(data, clipping: str) -> None:
    objective = PretextObjective({"mae": 1.0, "rotation": 1.0})
    x = _batch(data)
    plain = _step(_model(objective), objective, x, dp=False)
    private = _step(_model(objective), objective, x, dp=True, noise=0.0, clip=1e6, clipping=clipping)
    assert plain.abs().max() > 0
    torch.testing.assert_close(private, plain, rtol=1e-4, atol=1e-5 * plain.abs().max().item())


@CLIPPING
def test_dp_step_clips_per_sample_gradients(data, clipping: str) -> None:
    objective = PretextObjective({"mae": 1.0, "rotation": 1.0})
    x, lr, clip = _batch(data), 1.0, 1e-3
    plain = _step(_model(objective), objective, x, dp=False, lr=lr)
    clipped = _step(_model(objective), objective, x, dp=True, noise=0.0, clip=clip, lr=lr, clipping=clipping)
    # Mean of per-sample gradients each clipped to norm <= clip: the update is within lr * clip.
    assert clipped.norm() <= lr * clip * (1 + 1e-4)
    assert clipped.norm() > 0.1 * lr * clip
    assert plain.norm() > 100 * lr * clip  # so the bound above is clipping's doing


@CLIPPING
def test_dp_step_adds_gaussian_noise_at_the_planned_scale(data, clipping: str) -> None:
    objective = PretextObjective({"mae": 1.0})
    x, lr, clip, sigma = _batch(data), 1.0, 0.5, 1.0
    kw = dict(dp=True, noise=sigma, clip=clip, lr=lr, clipping=clipping)
    a = _step(_model(objective), objective, x, noise_seed=1, **kw)
    b = _step(_model(objective), objective, x, noise_seed=2, **kw)
    again = _step(_model(objective), objective, x, noise_seed=1, **kw)
    assert torch.equal(a, again)
    # Same data and masks, so the difference is the noise: per coordinate N(0, 2 (sigma clip / B)^2) lr^2.
    expected_std = lr * math.sqrt(2) * sigma * clip / x.shape[0]
    assert (a - b).std().item() == pytest.approx(expected_std, rel=0.1)
    assert (a - b).mean().abs().item() < 0.1 * expected_std


# --------------------------------------------------------------------------------------------------
# train_local under DP
# --------------------------------------------------------------------------------------------------
def _train(data, objective, *, seed: int, ledger_plan=None, max_physical_batch: int = 512,
           steps: int = 2, batch_size: int = 32, clipping: str = "ghost", secret_seed: int | None = 0):
    """``secret_seed`` seeds the DP noise and Poisson sampling (tests only); None = a secret one, as sites do."""
    model = _model(objective)
    spec = TrainingSpec(batch_size=batch_size, local_steps=steps, lr=0.1, optimizer="sgd", weight_decay=0.0,
                          max_physical_batch=max_physical_batch, dp_clipping=clipping)
    ledger = PrivacyLedger(ledger_plan) if ledger_plan is not None else None
    secret = torch.Generator().manual_seed(secret_seed) if secret_seed is not None else None
    result, _ = train_local(model, objective, data, FLAG, spec, generator=torch.Generator().manual_seed(seed),
                            secret_generator=secret, ledger=ledger)
    return _weights(model), result, ledger


def test_dp_noise_and_sampling_are_secret_but_the_rest_is_seeded(data) -> None:
    """Same seeded generator, no secret one given: each run draws its own noise and batches from
    os.urandom, so nobody holding the seed can replay the release. Without DP the seed fixes everything."""
    objective = PretextObjective({"mae": 1.0})
    plan = plan_dp(num_examples=len(data), batch_size=32, steps_per_round=2, rounds=1, noise_multiplier=1.0)
    w1, r1, _ = _train(data, objective, seed=1, ledger_plan=plan, secret_seed=None)
    w1_again, _, _ = _train(data, objective, seed=1, ledger_plan=plan, secret_seed=None)
    assert not torch.allclose(w1, w1_again)
    assert r1.epsilon is not None and r1.epsilon > 0
    # A given secret generator is the only way to reproduce a DP run (tests)...
    a, _, _ = _train(data, objective, seed=1, ledger_plan=plan, secret_seed=5)
    b, _, _ = _train(data, objective, seed=1, ledger_plan=plan, secret_seed=5)
    assert torch.equal(a, b)
    # ...and without DP the hospital's seeded generator fixes the run.
    p1, _, _ = _train(data, objective, seed=1, secret_seed=None)
    p2, _, _ = _train(data, objective, seed=1, secret_seed=None)
    assert torch.equal(p1, p2)


@pytest.mark.parametrize("mode", ["plain", "ghost", "hooks"])
def test_chunking_gives_the_same_update(data, mode: str) -> None:
    """max_physical_batch below the batch size: chunks summed into one step, same weights (noise 0)."""
    objective = _image_keyed_objective()
    dp = mode != "plain"
    plan = plan_dp(num_examples=len(data), batch_size=32, steps_per_round=2, rounds=1, noise_multiplier=0.0,
                   max_grad_norm=0.05) if dp else None
    clipping = "hooks" if mode == "hooks" else "ghost"
    whole, r_whole, _ = _train(data, objective, seed=3, ledger_plan=plan, clipping=clipping)
    chunked, r_chunked, ledger = _train(data, objective, seed=3, ledger_plan=plan, max_physical_batch=7,
                                        clipping=clipping)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert r_chunked.loss == pytest.approx(r_whole.loss, rel=1e-5)
    if dp:
        assert ledger.steps == 2  # one accountant step per logical batch, not per chunk
        assert r_chunked.epsilon == math.inf


def test_fedprox_term_is_added_once_per_logical_batch(data) -> None:
    """Plain training, batch 32 in chunks of 8: the proximal gradient mu (w - w_global) belongs to the
    logical batch, so chunking must not change the weights (it once counted the term per chunk)."""
    objective = _image_keyed_objective()
    weights = {}
    for chunk in (32, 8):
        model = _model(objective)
        spec = TrainingSpec(batch_size=32, local_steps=3, lr=0.1, optimizer="sgd", weight_decay=0.0,
                            max_physical_batch=chunk)
        train_local(model, objective, data, FLAG, spec, generator=torch.Generator().manual_seed(3), proximal_mu=0.1)
        weights[chunk] = _weights(model)
    torch.testing.assert_close(weights[8], weights[32], rtol=1e-5, atol=1e-6)


def test_dp_with_full_sampling_equals_plain_training(data) -> None:
    """q = 1 (every record in every batch), no noise, no clipping: train_local DP == plain."""
    objective = _image_keyed_objective()
    n = len(data)
    plan = plan_dp(num_examples=n, batch_size=n, steps_per_round=2, rounds=1, noise_multiplier=0.0,
                   max_grad_norm=1e6)
    plain, _, _ = _train(data, objective, seed=0, batch_size=n)
    private, _, _ = _train(data, objective, seed=0, batch_size=n, ledger_plan=plan)
    torch.testing.assert_close(private, plain, rtol=1e-4, atol=1e-6)


def test_dp_refuses_a_non_per_sample_objective(data) -> None:
    objective = PretextObjective({"mae": 1.0, "contrastive": 0.5})
    model = _model(objective)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_dp(num_examples=len(data), batch_size=16, steps_per_round=2, rounds=1, noise_multiplier=1.0)
    ledger = PrivacyLedger(plan)
    with pytest.raises(ValueError, match=r"contrastive are not sums of per-sample losses; DP-SGD cannot"):
        train_local(model, objective, data, FLAG, TrainingSpec(batch_size=16, local_steps=2),
                    generator=torch.Generator().manual_seed(0), ledger=ledger)
    assert ledger.steps == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
