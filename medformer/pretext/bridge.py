"""Dimension bridging (``bridge``): our own pretext task, one only this federation can pose.

2D and 3D sites share one transformer body. A 3D site also looks at each volume through the 2D
single-channel tokenizer (``inputs.2d-1ch``, the one the ultrasound and X-ray sites train): a
maximum-intensity projection of the volume along a random axis, a 2D image of the same anatomy.
The body's features of that projection should predict the (stop-gradient) features of the whole
volume: ``2 - 2 cos(predictor(embed2d(mip)), sg(embed3d(volume)))``. The 3D sites thereby train the
2D tokenizer and the body on views the 2D sites never see, tying the two dimensionalities into one
feature space; 2D sites contribute nothing to this term (their loss is 0). Per-sample: DP-SGD may run it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medformer.data import get_info
from medformer.layers import Mlp
from medformer.model import MedformerConfig
from medformer.pretext.base import PretextTask

BRIDGE_KIND = "2d-1ch"


class BridgeHead(nn.Module):
    def __init__(self, cfg: MedformerConfig):
        super().__init__()
        self.predictor = nn.Sequential(nn.LayerNorm(cfg.dim), Mlp(cfg.dim, 2 * cfg.dim, cfg.dim))


class DimensionBridge(PretextTask):
    name = "bridge"
    per_sample = True

    def build_head(self, cfg, datasets):
        return BridgeHead(cfg)

    def extra_inputs(self, datasets):
        return [(BRIDGE_KIND, size) for flag, size in datasets if get_info(flag).is_3d]

    def projected_losses(self, model, x: torch.Tensor, dataset: str, axis: int) -> torch.Tensor:
        """Loss terms [B] for volumes x [B, 1, D, H, W] projected along spatial ``axis`` (0, 1 or 2)."""
        mip = x.amax(dim=axis + 2)                                       # [B, 1, S, S]
        tokens = model.inputs[BRIDGE_KIND](mip)                          # the 2D sites' tokenizer
        pred = model.outputs[self.name].predictor(model.pool(model.encode_tokens(tokens, dataset)))
        with torch.no_grad():
            target = model.embed(x, dataset)
        return 2 - 2 * F.cosine_similarity(pred, target, dim=-1)

    def losses(self, model, x, dataset, generator=None):
        if x.dim() != 5:  # a 2D site: nothing to bridge
            return torch.zeros(x.shape[0], device=x.device)
        axis = int(torch.randint(0, 3, (1,), generator=generator))
        return self.projected_losses(model, x, dataset, axis)
