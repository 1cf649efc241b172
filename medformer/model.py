"""The Medformer: Input Adaptformer -> shared Body -> Output Adaptformer.

Our reading of the thesis design (see docs/DESIGN.md):

* ``inputs.<kind>.*``: one conv tokenizer per input kind (``2d-1ch``, ``2d-3ch``, ``3d-1ch``) and image
  size, so every size maps onto the same token grid (4x4 in 2D, 4x4x4 in 3D by default), with a
  learnable position table per grid and a light residual adapter per kind.
* ``latents.<dataset>.*``: a few learnable latent tokens per dataset, prepended to its patch tokens;
  they tell the shared body which modality it is looking at.
* ``body.*``: pre-norm transformer blocks shared by every hospital.
* ``outputs.<task>.*``: task query tokens that cross-attend to the body's tokens plus a head
  (``outputs.<dataset>`` for downstream tasks; pretext tasks add their own ``outputs.<name>``).

The parameter-name prefix is the sharing scope, and federated aggregation relies on it: a hospital
holds exactly the keys of a Medformer built for its own dataset (:func:`keys_for_dataset`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from medformer.data import DatasetInfo, get_info
from medformer.layers import Adapter, Block, ConvStem, CrossBlock, PatchEmbed, Prepend, QueryTokens, init_weights


STEMS = ("patch", "conv")
#: The task heads' readouts of the body's tokens (``MedformerConfig.global_pool``).
GLOBAL_POOLS = ("map", "avg")
#: How masked reconstruction keeps hidden cells out of a conv stem (``MedformerConfig.stem_masking``).
STEM_MASKINGS = ("pixels", "sparse")
#: The config's string fields and the values each takes.
CHOICES = {"stem": STEMS, "global_pool": GLOBAL_POOLS, "stem_masking": STEM_MASKINGS}


@dataclass(frozen=True)
class MedformerConfig:
    """Architecture of the Medformer.

    Args:
        dim: token width shared by every part.
        depth: number of transformer blocks in the body.
        heads: attention heads (must divide ``dim``).
        mlp_ratio: hidden width of the MLPs as a multiple of ``dim``.
        grid_2d: tokens per side for 28-pixel 2D inputs (``patch`` stem: 16 tokens at 4, patch = size /
            grid; ``conv`` stem: 49 at 7, and a 64-pixel input gets the grid its stride-2 stages reach).
        grid_3d: tokens per side for 3D inputs (64 tokens at 4).
        stem: the tokenizer of every input kind: ``patch`` (one linear projection per patch) or
            ``conv`` (3x3 convolutions with GroupNorm down to the grid: ``layers.ConvStem``).
        stem_width: channels of the conv stem's first stage (2D; 3D stems start at half).
        stem_3d_full_res: 3D conv stems start with a stride-1 stage at full resolution, as 2D ones
            always do (``layers.ConvStem``); without it their first conv halves the volume, which
            keeps them cheap but loses structures a voxel or two wide (vessels).
        stem_depth_2d: 3x3 convolutions per stage of the 2D conv stems (the first strided); 2 is the
            small supervised CNN's pattern (``baselines.SmallCNN``). Tried on validation at 2 in 2D and
            3D (federated, benchmarks/results/deepstem-val/): the same mean at twice the pretraining
            cost; vessel gained, breast lost.
        stem_depth_3d: the same for the 3D conv stems. Tried on validation at 2 with 1 in 2D
            (benchmarks/results/deepstem3d-val/): the fine-tune mean level, the 3D probes up, at
            1.85x the pretraining cost.
        stem_pool: the conv stems halve the resolution by 2x max-pooling before a stage instead of by
            a strided first conv (the small supervised CNN's pattern; ``layers.ConvStem``). Tried on
            validation with the CNN's widths, two convs a stage and ``global_pool="avg"``
            (benchmarks/results/cnnstem-val/): from scratch well above the default, but federated
            pretraining with today's pretexts fine-tunes below that model's own scratch numbers, and
            no pretext tried (mae, contrastive, rotation, site_rotation, distill) lifts its random-init
            probe beyond seed noise, nor at all on retina (benchmarks/results/pretext-c-val/).
        stem_masking: how masked reconstruction keeps the hidden cells out of a conv stem: ``pixels``
            (they are zeroed in the image before the stem) or ``sparse`` (the stem runs as SparK's
            sparse convolution: conv outputs zeroed at hidden cells, GroupNorm statistics over visible
            ones; ``layers.ConvStem``). Only the ``conv`` stem reads it; the rest of training and
            evaluation sees whole images either way. Tried on validation, two seeds, in a 2D
            federation (benchmarks/results/sparsestem-val/): probes level on the default model, and on
            the CNN-sized stem it did not bring pretrained fine-tunes up to that model's scratch ones.
        num_latents: latent tokens per dataset.
        adapter_dim: bottleneck width of the per-kind input adapter.
        global_pool: how a downstream task head reads the body's tokens: ``map`` (its query tokens
            cross-attend to them, as timm's attention pooling) or ``avg`` (the mean of the patch tokens,
            normalised, as the small supervised CNN's global average pooling).
        num_queries: query tokens per downstream task head (``map``).
        decoder_dim: width of the masked-reconstruction decoder.
        decoder_depth: blocks in that decoder.
        decoder_heads: attention heads in that decoder.
        site_norms: every LayerNorm of the body is the dataset's own (``body.site_norms.<dataset>``)
            and the rest of the body is shared: FedBN's idea (Li et al. 2021) for LayerNorm. Only
            the site holding a dataset trains and sends its norms, so keyed FedAvg leaves them
            personal; the attention and MLP weights are averaged over every site.
    """

    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    grid_2d: int = 4
    grid_3d: int = 4
    stem: str = "patch"
    stem_width: int = 32
    stem_3d_full_res: bool = False
    stem_depth_2d: int = 1
    stem_depth_3d: int = 1
    stem_pool: bool = False
    stem_masking: str = "pixels"
    num_latents: int = 2
    adapter_dim: int = 32
    global_pool: str = "map"
    num_queries: int = 2
    decoder_dim: int = 64
    decoder_depth: int = 1
    decoder_heads: int = 2
    site_norms: bool = False

    def __post_init__(self) -> None:
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in CHOICES:
                if value not in CHOICES[f.name]:
                    problems.append(f"{f.name}={value!r} must be one of {', '.join(CHOICES[f.name])}")
            elif f.type == "bool":  # annotations are strings here (``from __future__ import annotations``)
                if not isinstance(value, bool):
                    problems.append(f"{f.name}={value!r} must be true or false")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                problems.append(f"{f.name}={value!r} must be a positive number")
        if not problems:
            if self.dim % self.heads:
                problems.append(f"heads={self.heads} must divide dim={self.dim}")
            if self.stem_masking == "sparse" and self.stem != "conv":
                problems.append(f"stem_masking='sparse' needs stem='conv' (stem={self.stem!r}: a patch token "
                                "reads its own patch alone, so there is nothing to keep out)")
            if self.decoder_dim % self.decoder_heads:
                problems.append(f"decoder_heads={self.decoder_heads} must divide decoder_dim={self.decoder_dim}")
        if problems:
            raise ValueError("invalid Medformer config: " + "; ".join(problems))


#: Presets named by what they are, as timm names its models: size (tiny/small/base = width and depth),
#: stem, and tokens of a 28-pixel 2D image.
PRESETS: dict[str, MedformerConfig] = {
    # For tests: a few thousand parameters, milliseconds per step.
    "medformer_tiny_patch16": MedformerConfig(dim=32, depth=1, heads=2, num_latents=1, adapter_dim=8, num_queries=1,
                                              decoder_dim=16, decoder_depth=1, decoder_heads=2),
    # Tests of the conv stem: the same tiny transformer behind a narrow conv stem.
    "medformer_tiny_conv49": MedformerConfig(dim=32, depth=1, heads=2, grid_2d=7, stem="conv", stem_width=8,
                                             num_latents=1, adapter_dim=8, num_queries=1, decoder_dim=16,
                                             decoder_depth=1, decoder_heads=2),
    # Tests of site norms: that tiny conv model with each site's own body LayerNorms.
    "medformer_tiny_conv49_sitenorm": MedformerConfig(dim=32, depth=1, heads=2, grid_2d=7, stem="conv", stem_width=8,
                                                      num_latents=1, adapter_dim=8, num_queries=1, decoder_dim=16,
                                                      decoder_depth=1, decoder_heads=2, site_norms=True),
    # dim 128, depth 4 behind sixteen linearly projected 7x7 patches (64 in 3D): the first default.
    "medformer_small_patch16": MedformerConfig(),
    # The same body behind a conv stem: 49 tokens in 2D, 64 in 3D.
    "medformer_small_conv49": MedformerConfig(grid_2d=7, stem="conv", stem_width=32),
    # That model with each site's own body LayerNorms (``site_norms``).
    "medformer_small_conv49_sitenorm": MedformerConfig(grid_2d=7, stem="conv", stem_width=32, site_norms=True),
    # The conv model with a full-resolution first stage in 3D too (``stem_3d_full_res``).
    "medformer_small_conv49_fr3d": MedformerConfig(grid_2d=7, stem="conv", stem_width=32, stem_3d_full_res=True),
    # Tests of that stem: the tiny conv model with it.
    "medformer_tiny_conv49_fr3d": MedformerConfig(dim=32, depth=1, heads=2, grid_2d=7, stem="conv", stem_width=8,
                                                  stem_3d_full_res=True, num_latents=1, adapter_dim=8,
                                                  num_queries=1, decoder_dim=16, decoder_depth=1, decoder_heads=2),
    # Tests of the deeper stem (``stem_depth_2d=stem_depth_3d=2``): the tiny fr3d model with two convs a stage.
    "medformer_tiny_deepconv49_fr3d": MedformerConfig(dim=32, depth=1, heads=2, grid_2d=7, stem="conv", stem_width=8,
                                                      stem_3d_full_res=True, stem_depth_2d=2, stem_depth_3d=2,
                                                      num_latents=1, adapter_dim=8, num_queries=1, decoder_dim=16,
                                                      decoder_depth=1, decoder_heads=2),
    # Tests of the max-pooling stem (``stem_pool``): the tiny deep fr3d model, pooling between stages.
    "medformer_tiny_pooldeepconv49_fr3d": MedformerConfig(dim=32, depth=1, heads=2, grid_2d=7, stem="conv",
                                                          stem_width=8, stem_3d_full_res=True, stem_depth_2d=2,
                                                          stem_depth_3d=2, stem_pool=True, num_latents=1,
                                                          adapter_dim=8, num_queries=1, decoder_dim=16,
                                                          decoder_depth=1, decoder_heads=2),
    # Tests of the sparse stem under masked reconstruction (``stem_masking="sparse"``): that pooled model.
    "medformer_tiny_sparsepooldeepconv49_fr3d": MedformerConfig(dim=32, depth=1, heads=2, grid_2d=7, stem="conv",
                                                                stem_width=8, stem_3d_full_res=True, stem_depth_2d=2,
                                                                stem_depth_3d=2, stem_pool=True, stem_masking="sparse",
                                                                num_latents=1, adapter_dim=8, num_queries=1,
                                                                decoder_dim=16, decoder_depth=1, decoder_heads=2),
    # Wider and deeper, 49 linear patches: for machines with more compute.
    "medformer_base_patch49": MedformerConfig(dim=192, depth=6, heads=6, mlp_ratio=4.0, grid_2d=7, num_latents=4,
                                              adapter_dim=48, num_queries=4, decoder_dim=128, decoder_depth=2,
                                              decoder_heads=4),
}
#: Short names: ``tiny`` for tests, ``default`` for the model the scenarios use.
ALIASES: dict[str, str] = {"tiny": "medformer_tiny_patch16", "default": "medformer_small_conv49",
                           "base": "medformer_base_patch49"}


def preset_names() -> list[str]:
    """Every name :func:`make_config` accepts: the aliases, then the presets."""
    return [*ALIASES, *PRESETS]


def make_config(preset: str = "default", **overrides) -> MedformerConfig:
    """Preset by name (or alias), with field overrides. Unknown preset or field names are errors."""
    if preset not in PRESETS and preset not in ALIASES:
        raise ValueError(f"unknown model preset {preset!r}; choose from {', '.join(preset_names())}")
    preset = ALIASES.get(preset, preset)
    fields = {f.name: f.type for f in dataclasses.fields(MedformerConfig)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown model field(s) {', '.join(unknown)}; valid: {', '.join(fields)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


DatasetRef = str | tuple[str, int]


def normalise_datasets(datasets: Iterable[DatasetRef]) -> list[tuple[str, int]]:
    """Flags or (flag, size) pairs -> unique (flag, size) pairs (size 28 for a bare flag), in order."""
    out: list[tuple[str, int]] = []
    for ref in datasets:
        flag, size = (ref, 28) if isinstance(ref, str) else (ref[0], int(ref[1]))
        get_info(flag)  # fails early, listing the valid flags
        if (flag, size) not in out:
            out.append((flag, size))
    if not out:
        raise ValueError("a Medformer needs at least one dataset")
    return out


class InputAdaptformer(nn.Module):
    """Tokenizers (one per image size) + adapter for one input kind: image -> [B, N, dim]."""

    def __init__(self, kind: str, sizes: Sequence[int], cfg: MedformerConfig):
        super().__init__()
        ndim = 3 if kind.startswith("3d") else 2
        channels = int(kind.split("-")[1].rstrip("ch"))
        grid = cfg.grid_3d if ndim == 3 else cfg.grid_2d
        self.ndim = ndim

        def tokenizer(size: int) -> nn.Module:
            if cfg.stem == "conv":
                return ConvStem(ndim=ndim, in_channels=channels, img_size=size, grid=grid, dim=cfg.dim,
                                width=cfg.stem_width if ndim == 2 else max(1, cfg.stem_width // 2),
                                full_res=ndim == 2 or cfg.stem_3d_full_res,
                                depth=cfg.stem_depth_3d if ndim == 3 else cfg.stem_depth_2d, pool=cfg.stem_pool)
            return PatchEmbed(ndim=ndim, in_channels=channels, img_size=size, grid=grid, dim=cfg.dim)

        self.tokenizers = nn.ModuleDict({str(s): tokenizer(s) for s in sorted(set(sizes))})
        self.adapter = Adapter(cfg.dim, cfg.adapter_dim)

    def tokenizer(self, size: int) -> PatchEmbed | ConvStem:
        try:
            return self.tokenizers[str(size)]
        except KeyError:
            raise ValueError(f"no tokenizer for size {size}; this model has {list(self.tokenizers)}") from None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` [B, N] (1 = hidden): the tokenizer keeps those cells out of the visible tokens."""
        return self.adapter(self.tokenizer(x.shape[-1])(x, mask))


class SiteNorms(nn.Module):
    """One dataset's LayerNorms of the body: two per block, then the final one."""

    def __init__(self, cfg: MedformerConfig):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleList([nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)])
                                    for _ in range(cfg.depth))
        self.final = nn.LayerNorm(cfg.dim)


class Body(nn.Module):
    """Shared transformer: [B, L, dim] -> [B, L, dim] (normalised).

    With ``cfg.site_norms`` its LayerNorms are per dataset (``site_norms.<dataset>``, see
    :class:`MedformerConfig`) and ``forward`` needs the dataset.
    """

    def __init__(self, cfg: MedformerConfig, datasets: Sequence[str] = ()):
        super().__init__()
        own = not cfg.site_norms
        self.blocks = nn.Sequential(*[Block(cfg.dim, cfg.heads, cfg.mlp_ratio, own_norms=own)
                                      for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim) if own else None
        self.site_norms = None if own else nn.ModuleDict({d: SiteNorms(cfg) for d in datasets})

    def forward(self, x: torch.Tensor, dataset: str | None = None, *,
                hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``hidden``, when given, receives every block's output (the residual stream, before any norm)."""
        if self.site_norms is None:
            pairs, final = [None] * len(self.blocks), self.norm
        elif dataset not in self.site_norms:
            raise KeyError(f"no body norms for dataset {dataset!r}; this body has {sorted(self.site_norms)}")
        else:
            norms = self.site_norms[dataset]
            pairs, final = [(a, b) for a, b in norms.blocks], norms.final
        for block, pair in zip(self.blocks, pairs):
            x = block(x, pair)
            if hidden is not None:
                hidden.append(x)
        return final(x)


def mean_patch_tokens(tokens: torch.Tensor, num_latents: int) -> torch.Tensor:
    """Mean of the patch tokens, the latents (first) left out: [B, T + N, dim] -> [B, dim]."""
    return tokens[:, num_latents:].mean(dim=1)


class TaskHead(nn.Module):
    """Output Adaptformer for one task: body tokens [B, T + N, dim] -> [B, num_outputs] logits.

    ``cfg.global_pool`` picks the readout: ``map``, query tokens cross-attend to all the tokens; ``avg``,
    the mean of the N patch tokens. Either is then normalised and projected.
    """

    def __init__(self, cfg: MedformerConfig, num_outputs: int):
        super().__init__()
        self.global_pool, self.num_latents = cfg.global_pool, cfg.num_latents
        if cfg.global_pool == "map":
            self.queries = QueryTokens(cfg.num_queries, cfg.dim)
            self.cross = CrossBlock(cfg.dim, cfg.heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(cfg.dim)
        self.fc = nn.Linear(cfg.dim, num_outputs)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "avg":
            return self.fc(self.norm(mean_patch_tokens(tokens, self.num_latents)))
        # Detached on purpose: QueryTokens reads only the batch size, so its output is not connected
        # to a grad-requiring input, and Opacus's backward hook would never fire (no per-sample
        # gradients for the queries under DP-SGD). With a plain input the hook fires on the output.
        q = self.cross(self.queries(tokens.detach()), tokens)
        return self.fc(self.norm(q).mean(dim=1))


class Medformer(nn.Module):
    """Input Adaptformer -> shared Body -> Output Adaptformer, composed from the parts passed in
    (:func:`build_medformer` builds them from a config, as timm's model functions do).

    Args:
        cfg: the architecture the parts were built with (pooling reads ``num_latents``; export saves it).
        datasets: the (flag, size) pairs the model serves.
        inputs: input kind (``2d-1ch`` ...) -> its InputAdaptformer (tokenizers per size + adapter).
        latents: dataset flag -> its latent tokens (``Prepend``).
        body: the shared transformer, [B, L, dim] -> [B, L, dim].
        outputs: task -> head: ``outputs.<dataset>`` downstream heads, ``outputs.<pretext task>`` heads.
    """

    def __init__(self, cfg: MedformerConfig, *, datasets: Sequence[tuple[str, int]], inputs: nn.ModuleDict,
                 latents: nn.ModuleDict, body: nn.Module, outputs: nn.ModuleDict):
        super().__init__()
        self.cfg = cfg
        self.datasets = list(datasets)
        self.infos: dict[str, DatasetInfo] = {f: get_info(f) for f, _ in self.datasets}
        self.inputs, self.latents, self.body, self.outputs = inputs, latents, body, outputs

    # ---- Input Adaptformer -------------------------------------------------------------------
    def info(self, dataset: str) -> DatasetInfo:
        if dataset not in self.infos:
            raise KeyError(f"dataset {dataset!r} is not in this model; it has {sorted(self.infos)}")
        return self.infos[dataset]

    def patch_tokens(self, x: torch.Tensor, dataset: str, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Image -> positioned, adapted patch tokens: [B, C, *S] -> [B, N, dim]. With ``mask`` [B, N]
        (1 = hidden) a conv stem runs sparse (``layers.ConvStem``): no visible token reads a hidden cell."""
        return self.inputs[self.info(dataset).input_kind](x, mask)

    def tokenizer(self, dataset: str, size: int) -> PatchEmbed | ConvStem:
        return self.inputs[self.info(dataset).input_kind].tokenizer(size)

    # ---- Body -----------------------------------------------------------------------------------
    def encode_tokens(self, tokens: torch.Tensor, dataset: str) -> torch.Tensor:
        """Patch tokens (all or a visible subset) -> body output with latents first: [B, T + N, dim]."""
        return self.body(self.latents[dataset](tokens), dataset)

    def forward_features(self, x: torch.Tensor, dataset: str) -> torch.Tensor:
        """Image -> body tokens [B, T + N, dim] (T = num_latents, first)."""
        return self.encode_tokens(self.patch_tokens(x, dataset), dataset)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean of the patch tokens: [B, T + N, dim] -> [B, dim]."""
        return mean_patch_tokens(tokens, self.cfg.num_latents)

    def embed(self, x: torch.Tensor, dataset: str) -> torch.Tensor:
        """Image -> pooled representation [B, dim] (what the pretext heads see)."""
        return self.pool(self.forward_features(x, dataset))

    def probe_features(self, x: torch.Tensor, dataset: str) -> torch.Tensor:
        """Image -> what a linear probe sees [B, depth * dim]: every body block's patch tokens,
        layer-normalised (the last block's by the body's own final norm) and mean-pooled, concatenated.

        Chosen on the validation splits over the last block's pooled tokens alone (``embed``), as
        iBOT / DINOv2 read several layers in linear evaluation; the federated probe gained there
        and held level on test (``benchmarks/results/readout-val/``, ``lastblock-probe-full/``).
        """
        hidden: list[torch.Tensor] = []
        final = self.body(self.latents[dataset](self.patch_tokens(x, dataset)), dataset, hidden=hidden)
        inner = [nn.functional.layer_norm(h, h.shape[-1:]) for h in hidden[:-1]]
        return torch.cat([self.pool(t) for t in (*inner, final)], dim=1)

    # ---- Output Adaptformer ----------------------------------------------------------------------
    def forward_head(self, tokens: torch.Tensor, dataset: str) -> torch.Tensor:
        """Body tokens -> downstream logits [B, num_outputs]."""
        return self.outputs[dataset](tokens)

    def forward(self, x: torch.Tensor, dataset: str) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, dataset), dataset)

    @property
    def embed_dim(self) -> int:
        """Width of :meth:`embed`'s features."""
        return self.cfg.dim

    @property
    def probe_dim(self) -> int:
        """Width of :meth:`probe_features`."""
        return self.cfg.depth * self.cfg.dim

    def fine_tune_parts(self, dataset: str, *, seed: int = 0) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Prepare to fine-tune on ``dataset``: its head (a fresh one, seeded, if it has none) and the
        encoder parts on its path (input kind, latents, body) train; everything else is frozen.

        Returns the head's parameters and the encoder's.
        """
        info = self.info(dataset)
        if dataset not in self.outputs:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                head = TaskHead(self.cfg, info.num_outputs)
                head.apply(init_weights)
            self.outputs[dataset] = head.to(next(self.parameters()).device)
        path = (f"inputs.{info.input_kind}.", f"latents.{dataset}.", "body.")
        head_prefix = f"outputs.{dataset}."
        heads, encoder = [], []
        for name, p in self.named_parameters():
            on_path = name.startswith(head_prefix) or name.startswith(path)
            if name.startswith("body.site_norms."):  # only this dataset's own norms are on its path
                on_path = name.startswith(f"body.site_norms.{dataset}.")
            p.requires_grad_(on_path)
            if on_path:
                (heads if name.startswith(head_prefix) else encoder).append(p)
        return heads, encoder

    def encoder_keys(self) -> list[str]:
        """State keys of the encoder (inputs, latents, body): what a probe freezes."""
        return [k for k in self.state_dict() if k.split(".")[0] in ("inputs", "latents", "body")]


def scope_of(key: str) -> str:
    """Sharing scope of a parameter name: 'body', 'inputs.<kind>', 'latents.<dataset>' or 'outputs.<task>';
    a site's own body norms (``site_norms``) are 'body.site_norms.<dataset>'."""
    parts = key.split(".")
    if parts[:2] == ["body", "site_norms"]:
        return ".".join(parts[:3])
    return parts[0] if parts[0] == "body" else ".".join(parts[:2])


def build_medformer(cfg: MedformerConfig, datasets: Iterable[DatasetRef], *, downstream_heads: bool = True,
                    extra_outputs: Mapping[str, nn.Module] | None = None,
                    extra_inputs: Iterable[tuple[str, int]] = ()) -> Medformer:
    """A Medformer for ``datasets`` (MedMNIST flags, or (flag, size) pairs), freshly initialised.

    Args:
        cfg: architecture.
        datasets: the datasets it serves; input kinds and sizes follow from ``medmnist.INFO``.
        downstream_heads: an ``outputs.<dataset>`` head per dataset (central evaluation builds them;
            a hospital's pretraining model does not need them).
        extra_outputs: further output modules by task name (pretext heads), kept under ``outputs.``.
        extra_inputs: further (input kind, size) tokenizers a pretext task uses (``bridge``).
    """
    datasets = normalise_datasets(datasets)
    infos = {f: get_info(f) for f, _ in datasets}
    sizes_by_kind: dict[str, list[int]] = {}
    for flag, size in datasets:
        sizes_by_kind.setdefault(infos[flag].input_kind, []).append(size)
    for kind, size in extra_inputs:
        sizes_by_kind.setdefault(kind, []).append(size)
    inputs = nn.ModuleDict({k: InputAdaptformer(k, s, cfg) for k, s in sizes_by_kind.items()})
    latents = nn.ModuleDict({f: Prepend(cfg.num_latents, cfg.dim) for f in infos})
    body = Body(cfg, list(infos))
    outputs: dict[str, nn.Module] = {}
    if downstream_heads:
        outputs.update({f: TaskHead(cfg, info.num_outputs) for f, info in infos.items()})
    outputs.update(extra_outputs or {})
    model = Medformer(cfg, datasets=datasets, inputs=inputs, latents=latents, body=body,
                      outputs=nn.ModuleDict(outputs))
    model.apply(init_weights)
    for m in model.modules():
        if isinstance(m, Adapter):
            m.zero_init()
    return model


def keys_for_dataset(
    cfg: MedformerConfig, dataset: DatasetRef, *, pretext_outputs: Mapping[str, nn.Module] | None = None,
    downstream_heads: bool = False,
) -> list[str]:
    """The state keys a hospital holding ``dataset`` uses (and sends/receives in federation)."""
    with torch.device("meta"):
        model = build_medformer(cfg, [dataset], downstream_heads=downstream_heads, extra_outputs=pretext_outputs)
    return list(model.state_dict())
