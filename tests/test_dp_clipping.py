"""Tests for medformer.dp_clipping (ghost clipping) against per-sample references.

What they pin down: the clipped sum of per-sample gradients that the ghost path leaves in ``p.grad``
equals the one built from per-sample gradients computed one sample at a time, and the one Opacus's
hooks path (GradSampleModule + DPOptimizer) produces, on 2D gray, 2D RGB and 3D inputs, for masked
reconstruction (fixed masks), rotation (fixed labels) and both at once (every body layer used twice),
with a bound that clips some samples and not others. A full DP-SGD step and train_local with noise,
FedProx and Poisson sampling give the same weights in both modes from the same generator.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medformer.data import get_info, load_split
from synthetic import write_synthetic_npz
from medformer.dp.clipping import GhostClipper, HooksClipping
from medformer.model import build_medformer, make_config
from medformer.pretext import PretextObjective, build_pretext_model, num_rotations
from medformer.dp.accounting import PrivacyLedger, plan_dp
from medformer.dp.optimizer import make_dp_sgd
from medformer.train import TrainingSpec, make_optimizer, train_local

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
              pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")]

CASES = [("breastmnist", "tiny"), ("retinamnist", "tiny"), ("adrenalmnist3d", "tiny"),
         ("breastmnist", "medformer_tiny_conv49"), ("retinamnist", "medformer_tiny_conv49"),
         ("adrenalmnist3d", "medformer_tiny_conv49"),
         ("breastmnist", "medformer_tiny_conv49_sitenorm"), ("adrenalmnist3d", "medformer_tiny_conv49_sitenorm"),
         ("vesselmnist3d", "medformer_tiny_conv49_fr3d"), ("breastmnist", "medformer_tiny_deepconv49_fr3d"),
         ("vesselmnist3d", "medformer_tiny_deepconv49_fr3d"), ("breastmnist", "medformer_tiny_pooldeepconv49_fr3d"),
         ("vesselmnist3d", "medformer_tiny_pooldeepconv49_fr3d"),
         ("breastmnist", "medformer_tiny_sparsepooldeepconv49_fr3d"),
         ("vesselmnist3d", "medformer_tiny_sparsepooldeepconv49_fr3d"),
         ("breastmnist", "medformer_small_patch16"), ("breastmnist", "default"), ("adrenalmnist3d", "default")]
OBJECTIVES = {"mae": {"mae": 1.0}, "rotation": {"rotation": 1.0}, "mae+rotation": {"mae": 1.0, "rotation": 1.0},
              "site_rotation": {"site_rotation": 1.0}}
B = 6


def _ids(cases):
    return [f"{f}-{p}" for f, p in cases]


def _model(flag: str, preset: str, objective: PretextObjective, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = build_pretext_model(make_config(preset), [flag], objective)
    return model.to(dtype).train()


def _inputs(model, flag: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch in [-1, 1] (the model's dtype), fixed MAE mask noise and rotation labels (each class once)."""
    info = get_info(flag)
    ndim = 3 if info.is_3d else 2
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = (torch.rand(B, info.n_channels, *(28,) * ndim, generator=g) * 2 - 1).to(dtype)
    noise = torch.rand(B, model.tokenizer(flag, 28).num_tokens, generator=g)
    labels = torch.arange(B) % num_rotations(ndim)
    return x, noise, labels


def _per_sample_losses(objective: PretextObjective, model, x, noise, labels, flag: str) -> torch.Tensor:
    """The objective's weighted per-sample terms with its randomness fixed (mask noise, labels)."""
    total = torch.zeros(x.shape[0])
    for name, task in objective.tasks.items():
        terms = task.masked_losses(model, x, flag, noise) if name == "mae" else task.rotated_losses(model, x, flag, labels)
        total = total + objective.weights[name] * terms
    return total


def _reference(model: nn.Module, losses, n: int, clip: float):
    """Per-sample gradients one sample at a time, flat-clipped, summed: {param: sum}, norms [n].

    ``losses(model, part)`` gives the per-sample losses of the samples in the slice ``part``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(n):
        grads = torch.autograd.grad(losses(model, slice(i, i + 1)).sum(), params, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
    norms = torch.stack([torch.cat([g.flatten() for g in row]).norm() for row in rows])
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    sums = [sum(factor[i] * rows[i][j] for i in range(n)) for j in range(len(params))]
    return dict(zip(params, sums)), norms


def _ghost(model: nn.Module, losses, n: int, clip: float):
    clipper = GhostClipper(model, clip)
    try:
        with clipper.recording():
            loss = losses(model, slice(0, n)).mean()
        norms = clipper.backward(loss)
        return {p: p.grad.clone() for p in clipper.params}, norms
    finally:
        clipper.close()
        model.zero_grad(set_to_none=True)


def _assert_close(got: dict, ref: dict, rel: float) -> None:
    scale = max(r.abs().max().item() for r in ref.values())
    assert scale > 0
    for p, r in ref.items():
        torch.testing.assert_close(got[p], r, rtol=rel, atol=rel * scale)


def _assert_ghost_matches_reference(model: nn.Module, losses, n: int) -> None:
    """With a bound at the median norm (some samples clipped, some not): norms and sums agree."""
    _, norms = _reference(model, losses, n, clip=math.inf)
    clip = norms.median().item()
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()
    ref, ref_norms = _reference(model, losses, n, clip)
    got, got_norms = _ghost(model, losses, n, clip)
    torch.testing.assert_close(got_norms, ref_norms, rtol=1e-9, atol=0.0)
    _assert_close(got, ref, rel=1e-9)
    assert all(p.requires_grad for p in model.parameters())  # the parameters are given back


def _pretext_losses(objective: PretextObjective, x, noise, labels, flag: str):
    return lambda model, part: _per_sample_losses(objective, model, x[part], noise[part], labels[part], flag)


# Float64 throughout, so that the one-sample-at-a-time reference is exact enough for a tight tolerance
# (in float32, batch-of-one kernels alone differ from batched ones by ~3e-5 on the default preset).
@pytest.mark.parametrize("objective_name", list(OBJECTIVES))
@pytest.mark.parametrize(("flag", "preset"), CASES, ids=_ids(CASES))
def test_ghost_clipped_sum_equals_per_sample_reference(flag: str, preset: str, objective_name: str) -> None:
    objective = PretextObjective(OBJECTIVES[objective_name])
    model = _model(flag, preset, objective, torch.float64)
    x, noise, labels = _inputs(model, flag)
    _assert_ghost_matches_reference(model, _pretext_losses(objective, x, noise, labels, flag), B)


@pytest.mark.parametrize("flag", ["breastmnist", "adrenalmnist3d"])
def test_ghost_downstream_head(flag: str) -> None:
    """Query tokens (broadcast from a detached input) and cross-attention, as in fine-tuning."""
    torch.manual_seed(0)
    model = build_medformer(make_config("tiny"), [flag], downstream_heads=True).to(torch.float64).train()
    x, _, _ = _inputs(model, flag)
    y = torch.arange(B) % get_info(flag).num_outputs
    _assert_ghost_matches_reference(
        model, lambda m, part: F.cross_entropy(m(x[part], flag), y[part], reduction="none"), B)


@pytest.mark.parametrize("preset", ["tiny", "medformer_tiny_conv49"])
def test_ghost_distill_and_bridge_match_reference(preset: str) -> None:
    """The EMA teacher (a moved copy) and the bridge's stop-grad target carry no per-sample gradient;
    views and projection axis fixed. Bridge: a 3D site's volumes through the 2D tokenizer."""
    objective = PretextObjective({"distill": 1.0})
    model = _model("breastmnist", preset, objective, torch.float64)
    distill = objective.tasks["distill"]
    objective.begin_round(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    objective.after_step(model)
    g = torch.Generator().manual_seed(3)
    v1, v2 = (torch.rand(B, 1, 28, 28, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))
    _assert_ghost_matches_reference(
        model, lambda m, part: distill.view_losses(m, v1[part], v2[part], "breastmnist"), B)

    objective = PretextObjective({"mae": 1.0, "bridge": 1.0})
    model = _model("adrenalmnist3d", preset, objective, torch.float64)
    bridge = objective.tasks["bridge"]
    x = torch.rand(B, 1, 28, 28, 28, generator=g, dtype=torch.float64) * 2 - 1
    _assert_ghost_matches_reference(
        model, lambda m, part: bridge.projected_losses(m, x[part], "adrenalmnist3d", axis=2), B)


def test_ghost_overlapping_convs_used_twice_and_plain_linear() -> None:
    """Convs that do not tile their input, each used twice: a 2D conv with few output positions as a
    matmul over its unfolded patches, a grouped one through Opacus's per-sample gradients."""
    from medformer.dp.clipping import _unfold_wins, _Use

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 4, 3, padding=1, groups=2),
                          nn.GELU(), nn.Conv2d(4, 3, 2, stride=2), nn.Flatten(),
                          nn.Linear(3 * 16, 5), nn.GELU(), nn.Linear(5, 1)).to(torch.float64).train()
    assert _unfold_wins(model[0], _Use([], torch.zeros(1, 4, 8, 8)))
    assert not _unfold_wins(model[2], _Use([], torch.zeros(1, 4, 8, 8)))  # groups: Opacus's unfold
    x, y = torch.randn(2, B, 2, 8, 8, dtype=torch.float64)
    _assert_ghost_matches_reference(
        model, lambda m, part: (m(x[part]) * m(y[part])).squeeze(1) + m(x[part]).squeeze(1) ** 2, B)


@pytest.mark.parametrize("conv", [
    nn.Conv3d(3, 4, 3, stride=2, padding=1),
    nn.Conv2d(2, 3, 3, padding=2, dilation=2),
    nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(1, 0)),
    nn.Conv1d(3, 2, 5, padding=(1,)),
    nn.Conv2d(2, 3, 2, stride=2, padding="valid"),         # a patch tokenizer on a size it does not divide
], ids=["3d-strided", "2d-dilated", "2d-uneven", "1d", "2d-tiling-valid"])
def test_unfolded_patches_give_opacus_per_sample_gradients(conv: nn.Module) -> None:
    """Each sample's weight gradient, its output gradient times its unfolded patches, is Opacus's."""
    from opacus import GradSampleModule

    from medformer.dp.clipping import _unfolded_patches

    torch.manual_seed(0)
    conv = conv.to(torch.float64)
    nd = conv.weight.dim() - 2
    x = torch.randn(B, conv.in_channels, *(9,) * nd, dtype=torch.float64)
    grad = torch.randn_like(conv(x))
    got = torch.bmm(grad.flatten(2), _unfolded_patches(conv, x))
    ref = GradSampleModule.GRAD_SAMPLERS[type(conv)](conv, [x], grad)[conv.weight]
    torch.testing.assert_close(got, ref.flatten(2))


@pytest.mark.parametrize("form", [True, False], ids=["formed", "gram"])
def test_ghost_linear_used_three_times(monkeypatch, form: bool) -> None:
    """A Linear layer used three times with different token counts, its uses' outputs multiplied
    together: per-sample norms and clipped sums agree whether its per-sample gradients are formed or
    its norms come from the Gram matrices of every pair of uses."""
    import medformer.dp.clipping as clipping

    monkeypatch.setattr(clipping, "_form_per_sample", lambda *_: form)
    torch.manual_seed(0)
    layer = nn.Linear(5, 4).to(torch.float64).train()
    xs = [torch.randn(B, t, 5, dtype=torch.float64) for t in (1, 3, 7)]

    def losses(m, part):
        one, three, seven = (m(x[part]) for x in xs)
        return (one.sum(1) * three.sum(1)).sum(1) + (seven.tanh() ** 2).sum((1, 2))

    _assert_ghost_matches_reference(layer, losses, B)


@pytest.mark.parametrize("conv", [
    nn.Conv3d(1, 4, 3, padding=1, bias=False),             # a full-resolution 3D stem stage
    nn.Conv3d(3, 4, 3, stride=2, padding=1),               # strided, with a bias
    nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),     # grouped
    nn.Conv2d(2, 3, 3, padding=2, dilation=2),             # dilated
    nn.Conv1d(3, 2, 5, padding=(1,)),
], ids=["3d", "3d-strided-bias", "2d-grouped", "2d-dilated", "1d"])
def test_grouped_per_sample_conv_gradients_equal_opacus_unfold(conv: nn.Module) -> None:
    """The batch-folded grouped convolution gives each sample's weight and bias gradient exactly as
    Opacus's unfold does, and the clipper takes that path for a conv with many output positions."""
    from opacus import GradSampleModule

    from medformer.dp.clipping import _conv_per_sample, _grouped_conv_wins, _Use

    torch.manual_seed(0)
    conv = conv.to(torch.float64)
    side = {1: 40, 2: 16, 3: 8}[conv.weight.dim() - 2]
    x = torch.randn(B, conv.in_channels, *(side,) * (conv.weight.dim() - 2), dtype=torch.float64)
    grad = torch.randn_like(conv(x))
    got = _conv_per_sample(conv, [x], grad)
    ref = GradSampleModule.GRAD_SAMPLERS[type(conv)](conv, [x], grad)
    assert set(got) == set(ref)
    for param, per_sample in ref.items():
        torch.testing.assert_close(got[param], per_sample)
    full_res_stage = nn.Conv3d(1, 16, 3, padding=1)
    use = _Use([torch.zeros(1, 1, 28, 28, 28)], torch.zeros(1, 16, 28, 28, 28))
    assert _grouped_conv_wins(full_res_stage, use)
    assert not _grouped_conv_wins(nn.Conv2d(1, 32, 3, padding=1), _Use([], torch.zeros(1, 32, 28, 28)))


def _dp_step(model, objective, x, noise, labels, flag, *, clipping: str, clip: float, sigma: float,
             chunk: int | None = None, noise_seed: int = 0) -> torch.Tensor:
    """One DP-SGD step (SGD, lr 1) built from make_dp_sgd, in chunks; returns the weight change."""
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, TrainingSpec(optimizer="sgd", lr=1.0, weight_decay=0.0))
    optimizer, clipper = make_dp_sgd(model, optimizer, clipping=clipping, noise_multiplier=sigma,
                                     max_grad_norm=clip, expected_batch_size=x.shape[0],
                                     generator=torch.Generator().manual_seed(noise_seed))
    chunk = chunk or x.shape[0]
    try:
        for start in range(0, x.shape[0], chunk):
            part = slice(start, start + chunk)
            optimizer.zero_grad(set_to_none=True)
            with clipper.recording():
                loss = _per_sample_losses(objective, model, x[part], noise[part], labels[part], flag).mean()
            clipper.backward(loss)
            optimizer.signal_skip_step(do_skip=start + chunk < x.shape[0])
            optimizer.step()
    finally:
        clipper.close()
        for p in model.parameters():
            for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


DP_STEP_CASES = CASES[:3] + [("breastmnist", "medformer_tiny_conv49_sitenorm"),
                              ("vesselmnist3d", "medformer_tiny_sparsepooldeepconv49_fr3d")]


@pytest.mark.parametrize(("flag", "preset"), DP_STEP_CASES, ids=_ids(DP_STEP_CASES))
def test_ghost_dp_step_equals_opacus_hooks_step(flag: str, preset: str) -> None:
    """Noise 0: the same update; chunked (2 + 2 + 2) as whole; with noise: the same noise draws."""
    objective = PretextObjective(OBJECTIVES["mae+rotation"])
    x, noise, labels = _inputs(_model(flag, preset, objective), flag, seed=1)
    losses = _pretext_losses(objective, x, noise, labels, flag)
    _, norms = _reference(_model(flag, preset, objective), losses, B, clip=math.inf)
    clip = norms.median().item()

    def step(clipping, **kw):
        return _dp_step(_model(flag, preset, objective), objective, x, noise, labels, flag,
                        clipping=clipping, clip=clip, **kw)

    hooks = step("hooks", sigma=0.0)
    assert hooks.abs().max() > 0
    tol = dict(rtol=1e-4, atol=1e-5 * hooks.abs().max().item())
    torch.testing.assert_close(step("ghost", sigma=0.0), hooks, **tol)
    torch.testing.assert_close(step("ghost", sigma=0.0, chunk=2), hooks, **tol)
    torch.testing.assert_close(step("hooks", sigma=0.0, chunk=2), hooks, **tol)
    noisy_hooks = step("hooks", sigma=1.0, noise_seed=5)
    torch.testing.assert_close(step("ghost", sigma=1.0, noise_seed=5), noisy_hooks,
                               rtol=1e-4, atol=1e-5 * noisy_hooks.abs().max().item())


def test_ghost_noise_has_the_planned_scale() -> None:
    """Two noise seeds, same data: the difference is noise, N(0, 2 (sigma C / B)^2) per coordinate."""
    objective = PretextObjective(OBJECTIVES["mae"])
    flag, preset, clip, sigma = "breastmnist", "tiny", 0.5, 1.0
    x, noise, labels = _inputs(_model(flag, preset, objective), flag)
    a, b = (_dp_step(_model(flag, preset, objective), objective, x, noise, labels, flag, clipping="ghost",
                     clip=clip, sigma=sigma, noise_seed=s) for s in (1, 2))
    expected = math.sqrt(2) * sigma * clip / B
    assert (a - b).std().item() == pytest.approx(expected, rel=0.1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("medmnist")
    write_synthetic_npz(folder, "breastmnist", n_train=64, n_val=4, n_test=4, seed=0)
    return load_split("breastmnist", "train", data_dir=folder, verify=False)


@pytest.mark.parametrize(("batch", "steps"), [(8, 4), (1, 20)], ids=["rate-1/8", "rate-1/64-empty-batches"])
def test_train_local_ghost_equals_hooks_with_noise_fedprox_and_poisson_sampling(data, batch, steps) -> None:
    """Whole rounds from the same generator: same weights, same ledger, whichever clipping. At rate
    1/64 most Poisson batches are empty: their noise-only steps must match too."""
    objective = PretextObjective(OBJECTIVES["mae+rotation"])
    plan = plan_dp(num_examples=len(data), batch_size=batch, steps_per_round=steps, rounds=1,
                   noise_multiplier=0.8, max_grad_norm=0.05)
    out = {}
    for clipping in ("hooks", "ghost"):
        model = _model("breastmnist", "tiny", objective)
        spec = TrainingSpec(batch_size=batch, local_steps=steps, lr=0.1, optimizer="sgd", weight_decay=0.0,
                            dp_clipping=clipping)
        ledger = PrivacyLedger(plan)
        result, _ = train_local(model, objective, data, "breastmnist", spec, proximal_mu=0.5,
                                generator=torch.Generator().manual_seed(7),
                                secret_generator=torch.Generator().manual_seed(8), ledger=ledger)
        out[clipping] = (torch.cat([p.detach().flatten() for p in model.parameters()]), ledger.steps, result)
        assert all(p.requires_grad for p in model.parameters())
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed
    (w_hooks, steps_hooks, r_hooks), (w_ghost, steps_ghost, r_ghost) = out["hooks"], out["ghost"]
    torch.testing.assert_close(w_ghost, w_hooks, rtol=1e-4, atol=1e-6)
    assert steps_ghost == steps_hooks == steps
    assert r_ghost.epsilon == pytest.approx(r_hooks.epsilon)


def test_train_local_distill_under_dp_ghost_equals_hooks(data) -> None:
    """The teacher is copied before DP hooks are attached and moved after every step, in both modes."""
    objective = PretextObjective({"distill": 1.0})
    plan = plan_dp(num_examples=len(data), batch_size=8, steps_per_round=3, rounds=1,
                   noise_multiplier=0.8, max_grad_norm=0.05)
    weights, teachers = {}, {}
    for clipping in ("hooks", "ghost"):
        model = _model("breastmnist", "tiny", objective)
        start = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
        spec = TrainingSpec(batch_size=8, local_steps=3, lr=0.1, optimizer="sgd", weight_decay=0.0,
                            dp_clipping=clipping)
        train_local(model, objective, data, "breastmnist", spec, generator=torch.Generator().manual_seed(7),
                    secret_generator=torch.Generator().manual_seed(8), ledger=PrivacyLedger(plan))
        teacher = objective.tasks["distill"]._teacher
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())
        weights[clipping] = torch.cat([p.detach().flatten() for p in model.parameters()])
        teachers[clipping] = torch.cat([p.detach().flatten() for p in teacher.parameters()])
        # Three EMA steps towards the student: the teacher sits between start and student.
        assert 0 < (teachers[clipping] - start).norm() < (weights[clipping] - start).norm()
    torch.testing.assert_close(weights["ghost"], weights["hooks"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(teachers["ghost"], teachers["hooks"], rtol=1e-4, atol=1e-6)


def test_ghost_leaves_frozen_parameters_alone() -> None:
    objective = PretextObjective(OBJECTIVES["mae"])
    model = _model("breastmnist", "tiny", objective)
    frozen = [p for name, p in model.named_parameters() if name.startswith("body.")]
    for p in frozen:
        p.requires_grad_(False)
    x, noise, labels = _inputs(model, "breastmnist")
    got, _ = _ghost(model, _pretext_losses(objective, x, noise, labels, "breastmnist"), B, clip=1.0)
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    assert not any(p in got for p in frozen) and len(got) > 0


def test_ghost_refuses_buffers_and_unknown_modes() -> None:
    with pytest.raises(NotImplementedError, match="buffers"):
        GhostClipper(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), 1.0)
    with pytest.raises(ValueError, match="unknown dp_clipping 'fast'; choose from ghost, hooks"):
        TrainingSpec(dp_clipping="fast")


def test_channels_last_convs_ghost_stays_exact_and_hooks_refuse():
    """Opacus's conv grad sampler gets channels-last weights wrong; ghost clipping does not, and the
    hooks route refuses such a model by the parameter's name instead of clipping wrong norms."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                          nn.GELU(), nn.Conv2d(16, 4, 3, stride=2, padding=1))
    model.to(torch.float64, memory_format=torch.channels_last)
    x = torch.randn(B, 2, 16, 16, dtype=torch.float64).contiguous(memory_format=torch.channels_last)

    def losses(m, part):
        return m(x[part]).square().flatten(1).sum(1)

    _assert_ghost_matches_reference(model, losses, B)
    with pytest.raises(ValueError, match=r"'hooks' needs C-contiguous parameters; 0\.weight"):
        HooksClipping(model)


def test_opacus_conv_grad_sampler_is_still_wrong_on_channels_last():
    """Why HooksClipping refuses channels-last weights. If Opacus fixes its conv grad sampler, this
    fails: then drop the refusal."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, padding=1).to(torch.float64, memory_format=torch.channels_last)
    x = torch.randn(B, 2, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    want = [torch.stack([torch.autograd.grad(conv(x[i : i + 1]).square().sum(), p)[0] for i in range(B)])
            for p in (conv.weight, conv.bias)]
    gsm = GradSampleModule(conv, loss_reduction="sum")
    try:
        gsm(x).square().sum().backward()
        got = [conv.weight.grad_sample.clone(), conv.bias.grad_sample.clone()]
    finally:
        gsm._close()
    assert got[0].shape == want[0].shape and not torch.allclose(got[0], want[0])  # the weight: wrong
    torch.testing.assert_close(got[1], want[1])  # the bias: right
