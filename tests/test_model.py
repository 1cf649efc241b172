"""Tests for medformer.model: shapes over every input kind, sharing scopes, Opacus compatibility.

The per-sample gradient tests check what DP-SGD rests on: Opacus's hooks give, for every sample,
the gradient of that sample's own loss, equal to a ``torch.func`` reference (``functional_call`` +
``vmap(grad(...))``), for the downstream head and for the pretext losses with fixed randomness.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn
from torch.func import functional_call, grad, vmap

from medformer import data as D
from medformer.data.files import _to_split
from medformer.data import get_info
from medformer.layers import MaskedGroupNorm, visible_map
from medformer.model import Medformer, MedformerConfig, build_medformer, keys_for_dataset, make_config, scope_of
from medformer.pretext import TASKS, PretextObjective, build_pretext_model, num_rotations

# (flag, size): 2D gray at both sizes, 2D RGB, 3D at both sizes.
CASES = [("breastmnist", 28), ("breastmnist", 64), ("retinamnist", 28), ("adrenalmnist3d", 28),
         ("adrenalmnist3d", 64)]
REAL = [("breastmnist", 28), ("pneumoniamnist", 28), ("retinamnist", 28), ("adrenalmnist3d", 28),
        ("adrenalmnist3d", 64), ("vesselmnist3d", 28)]
ALL_TASKS = {name: 1.0 for name in TASKS}


def _batch(flag: str, size: int, b: int = 3, seed: int = 0) -> torch.Tensor:
    """Random images in [-1, 1]: [B, C, size, size] (2D) or [B, 1, size, size, size] (3D)."""
    info = get_info(flag)
    spatial = (size,) * (3 if info.is_3d else 2)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, info.n_channels, *spatial, generator=g) * 2 - 1


# Opacus's hooks on modules whose inputs need no grad, and vmap over CPU attention: both harmless.
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
              pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")]




def _real_batch(folder, flag: str, size: int, n: int = 4) -> torch.Tensor:
    """First n validation images of a real (MD5-checked) file, reading only that array."""
    path = D.dataset_path(flag, size, folder)
    with np.load(path, allow_pickle=False) as npz:
        images, labels = npz["val_images"][:n], npz["val_labels"][:n]
    return _to_split(flag, "val", size, get_info(flag), images, labels).batch(slice(None))[0]


def _ids(cases):
    return [f"{f}-{s}" for f, s in cases]


# --------------------------------------------------------------------------------------------------
# Forward / backward over every input kind and size
# --------------------------------------------------------------------------------------------------
#: Every tokenizer kind: linear patches (``tiny``), the conv stem, and the conv stem with a
#: full-resolution first stage in 3D, and that stem with two convs a stage.
STEMS = ["tiny", "medformer_tiny_conv49", "medformer_tiny_conv49_fr3d", "medformer_tiny_deepconv49_fr3d"]


@pytest.mark.parametrize("preset", STEMS)
@pytest.mark.parametrize(("flag", "size"), CASES, ids=_ids(CASES))
def test_forward_backward_every_kind_and_size(flag: str, size: int, preset: str) -> None:
    torch.manual_seed(0)
    model = build_medformer(make_config(preset), [(flag, size)])
    x = _batch(flag, size)
    out = model(x, flag)
    assert out.shape == (3, get_info(flag).num_outputs)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    for name, p in model.named_parameters():
        if name.startswith(("body.", f"inputs.{get_info(flag).input_kind}.tokenizers.{size}.")):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_model_rejects_unknown_size_and_dataset() -> None:
    model = build_medformer(make_config("tiny"), ["breastmnist"])
    with pytest.raises(ValueError, match="no tokenizer for size 64"):
        model(_batch("breastmnist", 64), "breastmnist")
    with pytest.raises(KeyError, match="not in this model"):
        model(_batch("breastmnist", 28), "pneumoniamnist")


@pytest.mark.real_data
@pytest.mark.parametrize("preset", STEMS)
def test_one_model_for_all_real_files(real_data_dir, preset: str) -> None:
    """One Medformer handles a batch of each real file: every pretext loss and every head."""
    torch.manual_seed(0)
    objective = PretextObjective(ALL_TASKS)
    model = build_pretext_model(make_config(preset), REAL, objective, downstream_heads=True)
    gen = torch.Generator().manual_seed(0)
    for flag, size in REAL:
        x = _real_batch(real_data_dir, flag, size)
        logits = model(x, flag)
        assert logits.shape == (4, get_info(flag).num_outputs), (flag, size)
        assert torch.isfinite(logits).all(), (flag, size)
        for name, task in objective.tasks.items():
            terms = task.losses(model, x, flag, gen)
            assert terms.shape == (4,), (flag, size, name)
            assert torch.isfinite(terms).all(), (flag, size, name)
        total, parts = objective(model, x, flag, gen)
        assert set(parts) == set(TASKS) and torch.isfinite(total)


# --------------------------------------------------------------------------------------------------
# Sharing scopes
# --------------------------------------------------------------------------------------------------
def test_every_key_carries_its_scope() -> None:
    objective = PretextObjective(ALL_TASKS)
    model = build_pretext_model(make_config("tiny"), CASES, objective, downstream_heads=True)
    kinds = {get_info(f).input_kind for f, _ in CASES}
    allowed = {"body"} | {f"inputs.{k}" for k in kinds} | {f"latents.{f}" for f, _ in CASES} \
        | {f"outputs.{f}" for f, _ in CASES} | {f"outputs.{t}" for t in TASKS}
    keys = list(model.state_dict())
    assert {scope_of(k) for k in keys} == allowed
    for k in keys:
        assert k.startswith(tuple(s + "." for s in allowed)), k


def test_keys_for_dataset_hold_only_the_hospitals_scopes() -> None:
    cfg = make_config("tiny")
    objective = PretextObjective({"mae": 1.0, "rotation": 1.0})
    k2d = keys_for_dataset(cfg, "breastmnist", pretext_outputs=objective.build_heads(cfg, ["breastmnist"]))
    k3d = keys_for_dataset(cfg, ("adrenalmnist3d", 64),
                           pretext_outputs=objective.build_heads(cfg, [("adrenalmnist3d", 64)]))
    krgb = keys_for_dataset(cfg, "retinamnist", pretext_outputs=objective.build_heads(cfg, ["retinamnist"]))
    assert not [k for k in k2d if k.startswith("inputs.3d-1ch")]
    assert not [k for k in k2d if k.startswith(("inputs.2d-3ch", "latents.retinamnist"))]
    assert not [k for k in k3d if k.startswith("inputs.2d")]
    assert any(k.startswith("inputs.3d-1ch.tokenizers.64.") for k in k3d)
    assert any(k.startswith("outputs.mae.") for k in k2d) and any(k.startswith("outputs.rotation.") for k in k3d)
    assert not [k for k in k2d + k3d if k.startswith("outputs.breastmnist")]  # no downstream heads
    body = [sorted(k for k in ks if k.startswith("body.")) for ks in (k2d, k3d, krgb)]
    assert body[0] and body[0] == body[1] == body[2]
    # The keys a hospital uses are exactly a subset of the global model's keys.
    everyone = ["breastmnist", ("adrenalmnist3d", 64), "retinamnist"]
    full = build_medformer(cfg, everyone, downstream_heads=False, extra_outputs=objective.build_heads(cfg, everyone))
    assert set(k2d) | set(k3d) | set(krgb) == set(full.state_dict())


# --------------------------------------------------------------------------------------------------
# Opacus compatibility
# --------------------------------------------------------------------------------------------------
def test_opacus_validator_finds_no_errors() -> None:
    model = build_pretext_model(make_config("tiny"), CASES, PretextObjective(ALL_TASKS), downstream_heads=True)
    assert ModuleValidator.validate(model, strict=False) == []


class _LossOf(nn.Module):
    """Wraps ``fn(model, *args) -> per-sample losses [B]`` so functional_call can swap params."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args):
        return self.fn(self.model, *args)


def _reference(model: nn.Module, fn, args: tuple[torch.Tensor, ...], use_vmap: bool = True) -> dict:
    """Per-sample gradients of fn's per-sample loss by torch.func: {param name: [B, *shape]}."""
    wrapper = _LossOf(model, fn)
    params = {f"model.{k}": v.detach() for k, v in model.named_parameters()}

    def loss_one(p, *one):
        return functional_call(wrapper, p, tuple(a[None] for a in one))[0]

    if use_vmap:
        out = vmap(grad(loss_one), in_dims=(None,) + (0,) * len(args))(params, *args)
    else:  # per-sample loop of grad(): for losses with data-dependent Python control flow
        rows = [grad(loss_one)(params, *(a[i] for a in args)) for i in range(args[0].shape[0])]
        out = {k: torch.stack([r[k] for r in rows]) for k in params}
    return {k.removeprefix("model."): v for k, v in out.items()}


def _opacus(model: nn.Module, fn, args: tuple[torch.Tensor, ...]) -> dict:
    """Per-sample gradients from Opacus's GradSampleModule (hooks) on the batch-mean loss."""
    gsm = GradSampleModule(model, loss_reduction="mean")
    try:
        model.zero_grad(set_to_none=True)
        fn(model, *args).mean().backward()
        out = {k: (p.grad_sample.detach().clone() if p.grad_sample is not None else None, p.grad)
               for k, p in model.named_parameters()}
    finally:
        gsm._close()
        for p in model.parameters():
            for attr in ("grad_sample", "_forward_counter", "_current_grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
    return out


def _assert_same_per_sample(model, fn, args, use_vmap=True) -> None:
    ref = _reference(model, fn, args, use_vmap)
    got = _opacus(model, fn, args)
    checked = 0
    for name, (gs, g) in got.items():
        r = ref[name]
        if gs is None:  # a parameter the loss does not use (another task's head)
            assert r.abs().max() == 0, f"{name}: Opacus has no grad_sample but the reference is non-zero"
            continue
        scale = r.abs().max().item() + 1e-12
        assert gs.shape == r.shape, name
        err = (gs - r).abs().max().item()
        assert err <= 1e-5 * scale + 1e-8, f"{name}: per-sample gradients differ by {err:.2e} (scale {scale:.2e})"
        assert torch.allclose(gs.mean(0), g, rtol=1e-4, atol=1e-7 + 1e-5 * scale), name
        checked += 1
    assert checked >= 10


PS_CASES = [("breastmnist", 28), ("retinamnist", 28), ("adrenalmnist3d", 28)]


@pytest.fixture(scope="module", params=STEMS)
def ps_model(request) -> Medformer:
    torch.manual_seed(0)
    objective = PretextObjective({"mae": 1.0, "rotation": 1.0})
    return build_pretext_model(make_config(request.param), PS_CASES, objective, downstream_heads=True)


@pytest.mark.parametrize(("flag", "size"), PS_CASES, ids=_ids(PS_CASES))
def test_per_sample_gradients_downstream_head(ps_model, flag: str, size: int) -> None:
    b = 4
    x = _batch(flag, size, b, seed=1)
    y = torch.arange(b) % get_info(flag).num_outputs

    def fn(m, x, y):
        return F.cross_entropy(m(x, flag), y, reduction="none")

    _assert_same_per_sample(ps_model, fn, (x, y))


@pytest.mark.parametrize(("flag", "size"), PS_CASES, ids=_ids(PS_CASES))
def test_per_sample_gradients_masked_reconstruction(ps_model, flag: str, size: int) -> None:
    b = 4
    x = _batch(flag, size, b, seed=2)
    n = ps_model.tokenizer(flag, size).num_tokens
    noise = torch.rand(b, n, generator=torch.Generator().manual_seed(3))  # fixes each sample's mask
    mae = PretextObjective({"mae": 1.0}).tasks["mae"]

    def fn(m, x, noise):
        return mae.masked_losses(m, x, flag, noise)

    _assert_same_per_sample(ps_model, fn, (x, noise))


@pytest.mark.parametrize(("flag", "size"), PS_CASES, ids=_ids(PS_CASES))
def test_per_sample_gradients_rotation(ps_model, flag: str, size: int) -> None:
    b = 4
    x = _batch(flag, size, b, seed=4)
    labels = torch.tensor([0, 1, 2, num_rotations(x.dim() - 2) - 1])
    rot = PretextObjective({"rotation": 1.0}).tasks["rotation"]

    def fn(m, x, labels):
        return rot.rotated_losses(m, x, flag, labels)

    # rotate() groups samples by label (data-dependent control flow): reference loops over grad().
    _assert_same_per_sample(ps_model, fn, (x, labels), use_vmap=False)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
def test_make_config_presets_and_overrides() -> None:
    assert make_config("medformer_small_patch16") == MedformerConfig()
    assert make_config() == make_config("default") == make_config("medformer_small_conv49")
    assert make_config("tiny", depth=2).depth == 2
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'; choose from tiny, default, base, medformer_"):
        make_config("huge")
    with pytest.raises(ValueError, match=r"unknown model field\(s\) wdth, width; valid: dim, depth"):
        make_config("tiny", wdth=3, width=4)


def test_full_resolution_3d_stem_keeps_the_token_grid() -> None:
    """``stem_3d_full_res`` adds a stride-1 stage before the 3D stem's first halving, as in 2D; the
    grid (what masked reconstruction masks) and the 2D stem stay as they were."""
    plain = build_medformer(make_config("medformer_tiny_conv49"), ["adrenalmnist3d", "breastmnist"])
    full = build_medformer(make_config("medformer_tiny_conv49_fr3d"), ["adrenalmnist3d", "breastmnist"])
    strides = {name: [c.stride[0] for c in m.inputs["3d-1ch"].tokenizer(28).convs if isinstance(c, nn.Conv3d)]
               for name, m in (("plain", plain), ("full", full))}
    assert strides == {"plain": [2, 2, 2], "full": [1, 2, 2, 2]}
    assert full.tokenizer("adrenalmnist3d", 28).num_tokens == plain.tokenizer("adrenalmnist3d", 28).num_tokens == 64
    two_d = [{k: v.shape for k, v in m.inputs["2d-1ch"].state_dict().items()} for m in (plain, full)]
    assert two_d[0] == two_d[1]
    with pytest.raises(ValueError, match="stem_3d_full_res=1 must be true or false"):
        make_config("medformer_tiny_conv49", stem_3d_full_res=1)


def _assert_same_token_grid_and_outputs(a: nn.Module, b: nn.Module, flags: list[str]) -> None:
    """Two stems of one model family: as many tokens per 28-pixel input, outputs of the same shape."""
    for flag in flags:
        assert a.tokenizer(flag, 28).num_tokens == b.tokenizer(flag, 28).num_tokens
        x = _batch(flag, 28)
        assert a(x, flag).shape == b(x, flag).shape


def test_deeper_conv_stem_adds_stride_one_convs_and_keeps_the_token_grid() -> None:
    """``stem_depth_2d=stem_depth_3d=2`` gives every stage of the conv stem a second, stride-1 conv
    (the small CNN's pattern); the strided convs, so the token grid and the output, stay as they were."""
    one = build_medformer(make_config("medformer_tiny_conv49_fr3d"), ["adrenalmnist3d", "breastmnist"])
    two = build_medformer(make_config("medformer_tiny_deepconv49_fr3d"), ["adrenalmnist3d", "breastmnist"])
    for kind, conv in (("3d-1ch", nn.Conv3d), ("2d-1ch", nn.Conv2d)):
        strides = [[c.stride[0] for c in m.inputs[kind].tokenizer(28).convs if isinstance(c, conv)] for m in (one, two)]
        assert strides[1] == [s for s in strides[0] for s in (s, 1)]
    _assert_same_token_grid_and_outputs(two, one, ["adrenalmnist3d", "breastmnist"])
    with pytest.raises(ValueError, match="stem_depth_3d=0 must be a positive number"):
        make_config("medformer_tiny_conv49", stem_depth_3d=0)


def test_pooling_stem_halves_by_max_pooling_and_keeps_the_token_grid() -> None:
    """``stem_pool`` moves every halving from a strided conv to a 2x max-pool before the stage (odd
    sides rounded up, as the strided conv does): all convs then have stride 1, and the token grid, the
    parameters' shapes (under other indices) and the output's shape are the strided stem's."""
    strided = build_medformer(make_config("medformer_tiny_deepconv49_fr3d"), ["adrenalmnist3d", "breastmnist"])
    pooled = build_medformer(make_config("medformer_tiny_pooldeepconv49_fr3d"), ["adrenalmnist3d", "breastmnist"])
    assert (sorted(tuple(p.shape) for p in strided.parameters())
            == sorted(tuple(p.shape) for p in pooled.parameters()))
    for kind, conv, pool in (("3d-1ch", nn.Conv3d, nn.MaxPool3d), ("2d-1ch", nn.Conv2d, nn.MaxPool2d)):
        stem_strided, stem_pooled = strided.inputs[kind].tokenizer(28), pooled.inputs[kind].tokenizer(28)
        assert all(c.stride[0] == 1 for c in stem_pooled.convs if isinstance(c, conv))
        halvings = sum(c.stride[0] == 2 for c in stem_strided.convs if isinstance(c, conv))
        assert sum(isinstance(m, pool) for m in stem_pooled.convs) == halvings
    # 28 -> 14 -> 7 (-> 4 in 3D: ceil of 3.5)
    _assert_same_token_grid_and_outputs(pooled, strided, ["adrenalmnist3d", "breastmnist"])
    with pytest.raises(ValueError, match="stem_pool=1 must be true or false"):
        make_config("medformer_tiny_conv49", stem_pool=1)


def test_masked_group_norm_takes_statistics_over_visible_positions() -> None:
    """Without a keep mask it is GroupNorm; with one, each sample's groups are normalised by the mean
    and variance of their visible positions alone (computed here by gathering them), and hidden
    positions come out 0."""
    torch.manual_seed(0)
    norm = MaskedGroupNorm(2, 4).double()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    for spatial in ((5, 5), (3, 4, 5)):
        x = torch.randn(3, 4, *spatial, dtype=torch.float64)
        torch.testing.assert_close(norm(x), F.group_norm(x, 2, norm.weight, norm.bias, norm.eps))
        keep = (torch.rand(3, 1, *spatial) > 0.5).double()
        out = norm(x, keep)
        for b in range(3):
            visible = keep[b, 0] > 0
            assert (out[b][:, ~visible] == 0).all()
            for g in (slice(0, 2), slice(2, 4)):
                seen = x[b, g][:, visible]
                expected = (seen - seen.mean()) / (seen.var(unbiased=False) + norm.eps).sqrt()
                expected = expected * norm.weight[g, None] + norm.bias[g, None]
                torch.testing.assert_close(out[b, g][:, visible], expected)


@pytest.mark.parametrize("ndim", [2, 3])
def test_visible_map_marks_each_position_by_its_token_cell(ndim: int) -> None:
    """At a size the grid divides, every position of token cell i is visible exactly when token i is;
    at a size it does not (a stem's odd intermediate sides), each position still takes one cell's value."""
    grid, patch = 4, 7
    mask = (torch.rand(2, grid**ndim, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    keep = visible_map(mask, grid, (grid * patch,) * ndim)
    cells = keep.unfold(2, patch, patch).unfold(3, patch, patch)
    if ndim == 3:
        cells = cells.unfold(4, patch, patch)
    cells = cells.reshape(2, grid**ndim, -1)  # [B, token, pixels of its cell], row-major like the mask
    assert (cells == (1 - mask)[..., None]).all()
    odd = visible_map(mask, grid, (7,) * ndim)
    assert odd.shape == (2, 1) + (7,) * ndim and set(odd.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("preset", ["medformer_tiny_conv49", "medformer_tiny_sparsepooldeepconv49_fr3d"])
@pytest.mark.parametrize("flag", ["retinamnist", "adrenalmnist3d"])
def test_sparse_conv_stem_keeps_hidden_cells_out_of_visible_tokens(preset: str, flag: str) -> None:
    """Given a token mask, a conv stem's visible tokens do not change when the hidden cells' pixels do
    (zeroed or noise), and differ from the tokens of the image with those cells zeroed (whose zeros the
    convolutions and norms would read); with nothing hidden it is the plain stem."""
    torch.manual_seed(0)
    stem = build_medformer(make_config(preset), [flag]).tokenizer(flag, 28).double()
    x = _batch(flag, 28, b=2).double()
    mask = (torch.rand(2, stem.num_tokens) < 0.6).double()
    mask[:, 0] = 0.0  # at least one visible token each
    hidden = F.interpolate(mask.reshape(2, 1, *(stem.grid,) * stem.ndim), size=x.shape[2:], mode="nearest")
    noised = x * (1 - hidden) + torch.randn_like(x) * hidden
    visible = mask == 0
    with torch.no_grad():
        tokens = stem(x, mask)
        torch.testing.assert_close(stem(noised, mask)[visible], tokens[visible])
        assert not torch.allclose(stem(x * (1 - hidden))[visible], tokens[visible])
        torch.testing.assert_close(stem(x, torch.zeros_like(mask)), stem(x))
    with pytest.raises(ValueError, match="stem_masking='sparse' needs stem='conv'"):
        make_config("tiny", stem_masking="sparse")


def test_avg_global_pool_head_reads_the_mean_patch_token() -> None:
    """``global_pool="avg"``: a task head is a LayerNorm and a Linear on the mean of the patch tokens
    (the latents left out), with no query tokens; ``map`` keeps them. A bad name is refused."""
    for flag in ("breastmnist", "adrenalmnist3d"):
        model = build_medformer(make_config("medformer_tiny_conv49", global_pool="avg"), [flag]).eval()
        head = model.outputs[flag]
        assert not any("queries" in k or "cross" in k for k in head.state_dict())
        x = _batch(flag, 28)
        with torch.no_grad():
            tokens = model.forward_features(x, flag)
            expected = head.fc(head.norm(tokens[:, model.cfg.num_latents:].mean(dim=1)))
            torch.testing.assert_close(model(x, flag), expected)
    mapped = build_medformer(make_config("medformer_tiny_conv49"), ["breastmnist"])
    assert any("queries" in k for k in mapped.outputs["breastmnist"].state_dict())
    with pytest.raises(ValueError, match="global_pool='gap' must be one of map, avg"):
        make_config("medformer_tiny_conv49", global_pool="gap")


def test_stem_depth_is_set_per_input_kind() -> None:
    """``stem_depth_3d`` deepens only the 3D stems: the 2D stem's weights are the one-conv model's."""
    one = build_medformer(make_config("medformer_tiny_conv49_fr3d"), ["adrenalmnist3d", "breastmnist"])
    deep3d = build_medformer(make_config("medformer_tiny_conv49_fr3d", stem_depth_3d=2),
                             ["adrenalmnist3d", "breastmnist"])
    shapes = [{kind: {k: v.shape for k, v in m.inputs[kind].state_dict().items()} for kind in m.inputs}
              for m in (one, deep3d)]
    assert shapes[0]["2d-1ch"] == shapes[1]["2d-1ch"]
    convs = [len([c for c in m.inputs["3d-1ch"].tokenizer(28).convs if isinstance(c, nn.Conv3d)])
             for m in (one, deep3d)]
    assert convs[1] == 2 * convs[0]


def test_config_rejects_heads_not_dividing_dim_and_non_positive_values() -> None:
    with pytest.raises(ValueError, match="heads=3 must divide dim=32"):
        make_config("tiny", heads=3)
    with pytest.raises(ValueError, match="decoder_heads=3 must divide decoder_dim=16"):
        make_config("tiny", decoder_heads=3)
    with pytest.raises(ValueError, match=r"depth=0 must be a positive number.*adapter_dim=-1"):
        make_config("tiny", depth=0, adapter_dim=-1)
    with pytest.raises(ValueError, match="token grid 5 does not divide image size 28"):
        build_medformer(make_config("tiny", grid_2d=5), ["breastmnist"])
