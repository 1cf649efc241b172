"""Tests for medformer.pretext: patch order, rotations, views, task registry and learning signal."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from medformer.data import load_split
from medformer.data import augment as named_augment
from medformer.data import random_view
from medformer.data import random_view as augment
from medformer.layers import PatchEmbed
from medformer.model import make_config
from medformer.pretext.mae import hide_masked
from medformer.pretext import (
    TASKS,
    Contrastive,
    DimensionBridge,
    MaskedReconstruction,
    PretextObjective,
    RotationPrediction,
    SelfDistillation,
    SimSiam,
    build_pretext_model,
    num_rotations,
    patchify,
    rotate,
)
from medformer.train import TrainingSpec, train_local


# Opacus's hooks on modules whose inputs need no grad, and vmap over CPU attention: both harmless.
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
              pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")]




# --------------------------------------------------------------------------------------------------
# patchify
# --------------------------------------------------------------------------------------------------
def _unpatchify(patches: torch.Tensor, patch: int, channels: int, ndim: int) -> torch.Tensor:
    """Inverse of patchify (test helper): [B, N, p^ndim * C] -> [B, C, *S]."""
    b, n, _ = patches.shape
    g = round(n ** (1 / ndim))
    x = patches.reshape(b, *([g] * ndim), *([patch] * ndim), channels)
    if ndim == 2:  # b, gh, gw, ph, pw, c -> b, c, gh, ph, gw, pw
        x = x.permute(0, 5, 1, 3, 2, 4)
    else:  # b, gd, gh, gw, pd, ph, pw, c -> b, c, gd, pd, gh, ph, gw, pw
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, *([g * patch] * ndim))


@pytest.mark.parametrize(("ndim", "channels", "size", "patch"),
                         [(2, 1, 28, 7), (2, 3, 28, 7), (2, 1, 64, 16), (3, 1, 28, 7), (3, 1, 12, 3)])
def test_patchify_round_trip_and_patch_contents(ndim, channels, size, patch) -> None:
    x = torch.randn(2, channels, *([size] * ndim))
    p = patchify(x, patch)
    g = size // patch
    assert p.shape == (2, g**ndim, patch**ndim * channels)
    assert torch.equal(_unpatchify(p, patch, channels, ndim), x)
    # Token j is the patch at grid position j in row-major order, features channel-last.
    for j, pos in enumerate(itertools.product(range(g), repeat=ndim)):
        window = x[(slice(None), slice(None)) + tuple(slice(i * patch, (i + 1) * patch) for i in pos)]
        assert torch.equal(p[:, j], window.movedim(1, -1).reshape(2, -1)), pos


@pytest.mark.parametrize(("ndim", "channels"), [(2, 1), (2, 3), (3, 1)])
def test_patchify_order_matches_the_tokenizer(ndim, channels) -> None:
    """A tokenizer whose conv copies pixels gives exactly patchify's tokens: same grid order."""
    size, grid = 28, 4
    patch = size // grid
    dim = patch**ndim * channels
    tok = PatchEmbed(ndim=ndim, in_channels=channels, img_size=size, grid=grid, dim=dim)
    weight = torch.zeros(dim, channels, *([patch] * ndim))
    for f, (*offset, c) in enumerate(itertools.product(*([range(patch)] * ndim), range(channels))):
        weight[(f, c, *offset)] = 1.0
    with torch.no_grad():
        tok.proj.weight.copy_(weight)
        tok.proj.bias.zero_()
        x = torch.randn(3, channels, *([size] * ndim))
        tokens = tok(x) - tok.position.pos
    torch.testing.assert_close(tokens, patchify(x, patch), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# rotate / augment
# --------------------------------------------------------------------------------------------------
def test_rotate_2d_label_k_is_rot90_k() -> None:
    x = torch.randn(8, 3, 28, 28)
    before = x.clone()
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    out = rotate(x, labels)
    for i, k in enumerate(labels.tolist()):
        assert torch.equal(out[i], torch.rot90(x[i], k, dims=(1, 2)))
    assert num_rotations(2) == 4
    assert torch.equal(x, before)  # input untouched
    assert torch.equal(rotate(x, torch.zeros(8, dtype=torch.long)), x)


def test_rotate_3d_ten_distinct_rotations_and_identity() -> None:
    vol = torch.randn(1, 1, 8, 8, 8)
    assert num_rotations(3) == 10
    outs = [rotate(vol, torch.tensor([c])) for c in range(10)]
    assert torch.equal(outs[0], vol)
    for a, b in itertools.combinations(range(10), 2):
        assert not torch.equal(outs[a], outs[b]), f"3D rotations {a} and {b} coincide"
    for o in outs:  # rotations permute voxels
        assert o.shape == vol.shape and torch.equal(o.flatten().sort().values, vol.flatten().sort().values)
    # A mixed batch rotates each sample by its own label.
    batch = vol.expand(10, -1, -1, -1, -1).clone()
    mixed = rotate(batch, torch.arange(10))
    for c in range(10):
        assert torch.equal(mixed[c : c + 1], outs[c])


@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (4, 3, 28, 28), (2, 1, 28, 28, 28)])
def test_augment_keeps_shape_and_range_and_varies(shape) -> None:
    x = torch.rand(*shape) * 2 - 1
    g = torch.Generator().manual_seed(0)
    a, b = augment(x, g), augment(x, g)
    for v in (a, b):
        assert v.shape == x.shape and v.dtype == x.dtype
        assert v.min() >= -1 and v.max() <= 1 and torch.isfinite(v).all()
    assert not torch.equal(a, b)
    assert (a - b).abs().mean() > 0.01
    assert torch.equal(augment(x, torch.Generator().manual_seed(0)), a)  # reproducible


@pytest.mark.parametrize("shape", [(64, 1, 28, 28), (32, 1, 8, 8, 8)])
def test_mirror_policy_flips_only_left_right(shape) -> None:
    """Without shift, a mirrored sample is the original or its left-right flip; never up-down."""
    x = torch.rand(*shape) * 2 - 1
    out = random_view(x, torch.Generator().manual_seed(0), flip_axes=(len(shape) - 3,), zoom=(1.0, 1.0),
                      shift=0.0, jitter=False)
    same = [torch.allclose(o, xi, atol=1e-5) for o, xi in zip(out, x)]
    mirrored = [torch.allclose(o, xi.flip(-1), atol=1e-5) for o, xi in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
    moved = named_augment(x, "mirror", torch.Generator().manual_seed(0))
    assert moved.shape == x.shape and not torch.equal(moved, x)
    assert torch.equal(named_augment(x, "none"), x)
    with pytest.raises(ValueError, match="unknown augmentation 'rot'; choose from none, mirror, views"):
        named_augment(x, "rot")


# --------------------------------------------------------------------------------------------------
# Task registry and objective
# --------------------------------------------------------------------------------------------------
def test_per_sample_flags() -> None:
    assert MaskedReconstruction.per_sample and RotationPrediction.per_sample and SimSiam.per_sample
    assert SelfDistillation.per_sample and DimensionBridge.per_sample
    assert not Contrastive.per_sample
    assert set(TASKS) == {"mae", "rotation", "site_rotation", "simsiam", "contrastive", "distill", "bridge"}


def test_site_rotation_keys_a_classifier_per_dataset() -> None:
    """``rotation`` shares one classifier per dimensionality; ``site_rotation`` gives each dataset its own,
    so a site's model (and what it sends) holds only its dataset's, and each trains only on its data."""
    cfg = make_config("tiny")
    both = [("breastmnist", 28), ("retinamnist", 28), ("adrenalmnist3d", 28)]

    def head_keys(task: str, datasets) -> set[str]:
        model = build_pretext_model(cfg, datasets, PretextObjective({task: 1.0}))
        return {k.split(".")[3] for k in model.state_dict() if k.startswith(f"outputs.{task}.heads.")}

    assert head_keys("rotation", both) == {"2d", "3d"}
    assert head_keys("site_rotation", both) == {"breastmnist", "retinamnist", "adrenalmnist3d"}
    assert head_keys("site_rotation", both[:1]) == {"breastmnist"}

    torch.manual_seed(0)
    model = build_pretext_model(cfg, both[:2], PretextObjective({"site_rotation": 1.0}))
    task = TASKS["site_rotation"]()
    task.losses(model, torch.randn(3, 1, 28, 28), "breastmnist", torch.Generator().manual_seed(0)).sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters() if k.startswith("outputs.site_rotation.")}
    own = [g for k, g in grads.items() if ".breastmnist." in k]
    other = [g for k, g in grads.items() if ".retinamnist." in k]
    assert own and other and len(own) + len(other) == len(grads)
    assert all(g is not None and g.abs().sum() > 0 for g in own) and all(g is None for g in other)


def test_objective_validation() -> None:
    with pytest.raises(ValueError, match=r"unknown pretext task\(s\) jigsaw, mea; choose from mae"):
        PretextObjective({"mea": 1.0, "jigsaw": 1.0})
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="pretext weights must be > 0"):
            PretextObjective({"mae": 1.0, "rotation": bad})
    with pytest.raises(ValueError, match="bridge needs another pretext task"):
        PretextObjective({"bridge": 1.0})
    with pytest.raises(ValueError, match="at least one pretext task"):
        PretextObjective({})
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\)"):
        PretextObjective({"mae": 1.0}, mask_ratio=1.0)


def test_objective_per_sample_only_without_contrastive() -> None:
    assert PretextObjective({"mae": 1.0, "rotation": 0.5, "simsiam": 1.0}).per_sample
    mixed = PretextObjective({"mae": 1.0, "contrastive": 0.5})
    assert not mixed.per_sample
    assert mixed.non_per_sample_tasks() == ["contrastive"]


def test_objective_is_the_weighted_mean_of_task_terms() -> None:
    torch.manual_seed(0)
    obj = PretextObjective({"mae": 2.0, "rotation": 0.5})
    model = build_pretext_model(make_config("tiny"), ["breastmnist"], obj)
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    total, parts = obj(model, x, "breastmnist", torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    mae = obj.tasks["mae"].losses(model, x, "breastmnist", g)
    rot = obj.tasks["rotation"].losses(model, x, "breastmnist", g)
    torch.testing.assert_close(total, (2.0 * mae + 0.5 * rot).mean())
    assert parts == pytest.approx({"mae": mae.detach().mean().item(), "rotation": rot.detach().mean().item()})


def test_mae_fixed_noise_fixes_the_mask() -> None:
    torch.manual_seed(0)
    obj = PretextObjective({"mae": 1.0}, mask_ratio=0.75)
    model = build_pretext_model(make_config("tiny"), [("adrenalmnist3d", 28)], obj)
    x = torch.rand(3, 1, 28, 28, 28) * 2 - 1
    noise = torch.rand(3, 64)
    mae = obj.tasks["mae"]
    a = mae.masked_losses(model, x, "adrenalmnist3d", noise)
    b = mae.masked_losses(model, x, "adrenalmnist3d", noise)
    assert a.shape == (3,) and torch.equal(a, b)
    assert not torch.equal(a, mae.masked_losses(model, x, "adrenalmnist3d", noise.flip(1)))


@pytest.mark.parametrize("stem_masking", ["pixels", "sparse"])
@pytest.mark.parametrize("flag", ["breastmnist", "adrenalmnist3d"])
def test_mae_encoder_never_reads_masked_pixels(flag: str, stem_masking: str) -> None:
    """Through a conv stem, whichever way it keeps masked cells out: the encoded visible tokens are the
    same when the masked patches' pixels are replaced with noise."""
    task = MaskedReconstruction()
    model = build_pretext_model(make_config("medformer_tiny_pooldeepconv49_fr3d", stem_masking=stem_masking),
                                [flag], PretextObjective({"mae": 1.0})).eval()
    tok = model.tokenizer(flag, 28)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, *(28,) * tok.ndim, generator=g) * 2 - 1
    ids_keep, mask = task.random_masking(torch.rand(2, tok.num_tokens, generator=g))
    hidden = 1 - hide_masked(torch.ones_like(x), mask, tok.patch)
    noised = x * (1 - hidden) + torch.randn(x.shape, generator=g) * hidden
    with torch.no_grad():
        torch.testing.assert_close(task.forward_encoder(model, noised, flag, ids_keep, mask),
                                   task.forward_encoder(model, x, flag, ids_keep, mask))


def test_distill_teacher_is_the_round_start_copy_moved_by_ema() -> None:
    torch.manual_seed(0)
    obj = PretextObjective({"distill": 1.0})
    model = build_pretext_model(make_config("tiny"), ["breastmnist"], obj)
    task: SelfDistillation = obj.tasks["distill"]
    obj.begin_round(model)
    teacher = task._teacher
    start = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in start.items())
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    obj.after_step(model)
    for (k, t), s in zip(teacher.named_parameters(), model.parameters()):
        torch.testing.assert_close(t, 0.99 * start[k] + 0.01 * s)
    # Outside training (evaluation, the audit) the model is its own stop-grad teacher.
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    head = model.outputs["distill"]
    z = head.projector(model.embed(x, "breastmnist"))
    own = 2 - 2 * torch.nn.functional.cosine_similarity(head.predictor(z), z, dim=-1)
    model.eval()
    torch.testing.assert_close(task.view_losses(model, x, x, "breastmnist"), own)
    model.train()
    assert not torch.allclose(task.view_losses(model, x, x, "breastmnist"), own)  # the moved teacher


def test_bridge_trains_the_2d_tokenizer_at_3d_sites_and_nothing_at_2d_sites() -> None:
    torch.manual_seed(0)
    obj = PretextObjective({"mae": 1.0, "bridge": 1.0})
    cfg = make_config("tiny")
    keys3d = set(build_pretext_model(cfg, [("adrenalmnist3d", 64)], obj).state_dict())
    assert any(k.startswith("inputs.2d-1ch.tokenizers.64.") for k in keys3d)
    both = build_pretext_model(cfg, ["breastmnist", ("adrenalmnist3d", 64)], obj)
    assert set(both.inputs["2d-1ch"].tokenizers) == {"28", "64"}
    bridge = obj.tasks["bridge"]
    x2d = torch.rand(3, 1, 28, 28) * 2 - 1
    assert torch.equal(bridge.losses(both, x2d, "breastmnist"), torch.zeros(3))
    x3d = torch.rand(3, 1, 64, 64, 64) * 2 - 1
    terms = bridge.projected_losses(both, x3d, "adrenalmnist3d", axis=1)
    assert terms.shape == (3,) and (terms > 0).all()
    terms.sum().backward()
    grads = [p.grad for p in both.inputs["2d-1ch"].tokenizers["64"].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in both.inputs["3d-1ch"].parameters())  # the target is stop-grad


# --------------------------------------------------------------------------------------------------
# Each task learns on real data
# --------------------------------------------------------------------------------------------------
# Steps per task: enough for a clear drop on each dataset, bounded in time (~40 s for all on one
# thread; 3D two-view tasks pay ~0.2 s a step for resampling two 64 x 28^3 views). Contrastive on 3D
# sits at chance (log 127) for ~30 steps before it falls; rotation on 3D needs ~150.
STEPS = {
    "pneumoniamnist": {"mae": 150, "rotation": 150, "site_rotation": 150, "simsiam": 100, "contrastive": 150,
                       "distill": 100},
    "adrenalmnist3d": {"mae": 80, "rotation": 200, "simsiam": 50, "contrastive": 60, "distill": 50, "bridge": 60},
}
CASES = [(flag, task) for flag, tasks in STEPS.items() for task in tasks]
assert {task for _, task in CASES} == set(TASKS)  # every task is shown to learn (bridge: 3D sites only)


@pytest.fixture(scope="module")
def real_train(real_data_dir):
    cache = {}

    def get(flag: str):
        if flag not in cache:
            cache[flag] = load_split(flag, "train", data_dir=real_data_dir)
        return cache[flag]

    return get


@pytest.mark.real_data
@pytest.mark.slow
@pytest.mark.parametrize(("flag", "task"), CASES)
def test_each_pretext_loss_falls_on_real_data(real_train, flag: str, task: str) -> None:
    data = real_train(flag)
    torch.manual_seed(0)
    # bridge cannot stand alone (its loss is 0 at 2D sites): a 1% MAE term beside it
    obj = PretextObjective({task: 1.0, "mae": 0.01} if task == "bridge" else {task: 1.0})
    model = build_pretext_model(make_config("tiny"), [flag], obj)
    losses: list[float] = []
    spec = TrainingSpec(batch_size=64, local_steps=STEPS[flag][task], lr=1e-3, optimizer="adamw")
    train_local(model, obj, data, flag, spec, generator=torch.Generator().manual_seed(0),
                on_step=lambda step, loss: losses.append(loss))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert all(math.isfinite(v) for v in losses)
    assert last < first, f"{task} on {flag}: mean loss of last 20 steps {last:.4f} >= first 20 {first:.4f}"
