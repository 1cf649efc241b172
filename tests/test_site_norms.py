"""Site norms: each dataset's own body LayerNorms stay personal under keyed FedAvg; the rest is shared.

(Their per-sample clipping is checked with the other layer types in test_dp_clipping.py.)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medformer.model import build_medformer, keys_for_dataset, make_config, scope_of
from server.aggregation import Update, keyed_mean

CFG = make_config("tiny", site_norms=True)


def test_site_norms_replace_the_body_s_shared_layernorms_with_one_set_per_dataset() -> None:
    model = build_medformer(CFG, ["breastmnist", "adrenalmnist3d"])
    body_norms = [k for k, m in model.body.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert body_norms and all(k.startswith("site_norms.") for k in body_norms)
    scopes = {scope_of(k) for k in model.state_dict()}
    assert {"body", "body.site_norms.breastmnist", "body.site_norms.adrenalmnist3d"} <= scopes
    # Each dataset's forward pass runs through its own norms: change one site's, only its output moves.
    x2d, x3d = torch.randn(2, 1, 28, 28), torch.randn(2, 1, 28, 28, 28)
    before = model.embed(x2d, "breastmnist"), model.embed(x3d, "adrenalmnist3d")
    with torch.no_grad():
        model.body.site_norms["breastmnist"].final.bias.add_(1.0)
    assert not torch.allclose(model.embed(x2d, "breastmnist"), before[0])
    assert torch.equal(model.embed(x3d, "adrenalmnist3d"), before[1])


def test_a_hospital_holds_only_its_own_norms_and_the_mean_leaves_them_personal() -> None:
    held = {f: keys_for_dataset(CFG, f) for f in ("breastmnist", "pneumoniamnist")}
    assert not [k for k in held["breastmnist"] if "site_norms.pneumoniamnist" in k]
    shared = set(held["breastmnist"]) & set(held["pneumoniamnist"])
    assert any(k.startswith("body.blocks.") for k in shared) and not any("site_norms" in k for k in shared)
    rng = np.random.default_rng(0)
    updates = [Update(f, {k: rng.normal(size=3).astype(np.float32) for k in keys}, n)
               for (f, keys), n in zip(held.items(), (100, 300))]
    mean = keyed_mean(updates)
    own = "body.site_norms.breastmnist.final.weight"
    np.testing.assert_array_equal(mean[own], updates[0].arrays[own])
    block = next(k for k in sorted(shared) if k.startswith("body.blocks."))
    np.testing.assert_allclose(mean[block], 0.25 * updates[0].arrays[block] + 0.75 * updates[1].arrays[block],
                               rtol=1e-6)


def test_fine_tuning_one_dataset_trains_its_norms_and_freezes_the_others() -> None:
    model = build_medformer(CFG, ["breastmnist", "pneumoniamnist"])
    _, encoder = model.fine_tune_parts("breastmnist")
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("body.site_norms.breastmnist.") for n in trains)
    assert not any(n.startswith("body.site_norms.pneumoniamnist.") for n in trains)
    assert any(n.startswith("body.blocks.") for n in trains) and len(encoder) > 0


def test_site_norms_must_be_a_boolean_and_a_missing_dataset_is_named() -> None:
    with pytest.raises(ValueError, match="site_norms"):
        make_config("tiny", site_norms=1)
    model = build_medformer(CFG, ["breastmnist"])
    with pytest.raises(KeyError, match="no body norms for dataset 'pneumoniamnist'"):
        model.body(torch.randn(1, 3, CFG.dim), "pneumoniamnist")
