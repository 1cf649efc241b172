"""A hospital's identity, local data and round, as the ClientApp resolves and trains them (no Flower runtime)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from client.round import train_round
from client.site import SiteConfigError, local_data
from client.site import site_from_node_config as identity_from_node_config
from client.policy import trusted_history as longer_history
from config import ModelSpec, Site, TrainingSpec
from medformer.model import make_config
from medformer.pretext import PretextObjective, build_pretext_model
from medformer.seeding import round_seed
from protocol import RoundInstructions
from synthetic import write_synthetic_npz


def test_deployment_site_comes_from_node_config(tmp_path):
    write_synthetic_npz(tmp_path, "breastmnist", n_train=40)
    site = identity_from_node_config({"dataset": "breastmnist", "data-dir": str(tmp_path)})
    assert (site.name, site.dataset, site.size, site.data_dir) == ("breastmnist", "breastmnist", 28, str(tmp_path))


@pytest.mark.parametrize("node_config, needle", [
    ({"dataset": "breastmnst"}, "node-config dataset"),
    ({"dataset": "breastmnist", "size": 27}, "size=27"),
    ({"dataset": "breastmnist", "data-dir": "/no/such/folder"}, "data-dir"),
    ({}, "names no site"),
    ({"partition-id": 5}, "names no site"),
])
def test_bad_node_config_is_a_clear_error(node_config, needle):
    with pytest.raises(SiteConfigError, match=needle.replace("=", ".")):
        identity_from_node_config(node_config)


def test_simulated_partitions_are_disjoint_and_cover_the_split(real_data_dir):
    clients = [{"name": f"p-{i}", "dataset": "pneumoniamnist", "size": 28, "partition_index": i,
                "partition_parts": 4, "partition_method": "dirichlet", "partition_alpha": 0.3} for i in range(4)]
    roster = {"sites": clients, "seed": 3, "data_dir": str(real_data_dir)}
    parts = [local_data(identity_from_node_config({"partition-id": i}, roster=roster), 3) for i in range(4)]
    assert sum(len(p) for p in parts) == 4708 and all(len(p) > 0 for p in parts)
    fingerprints = {p.images[j].tobytes() for p in parts for j in range(len(p))}
    assert len(fingerprints) > 4600  # disjoint up to the split's own duplicate images
    again = local_data(identity_from_node_config({"partition-id": 2}, roster=roster), 3)
    assert np.array_equal(again.labels, parts[2].labels)


def test_round_seed_and_history_choice():
    assert round_seed(0, "a", 1) == round_seed(0, "a", 1) != round_seed(0, "a", 2) != round_seed(0, "b", 1)
    short = '{"history": [[1.0, 0.1, 5]]}'
    long = '{"history": [[1.0, 0.1, 10]]}'
    assert longer_history(short, long) == long and longer_history(None, short) == short
    assert longer_history(None, None) is None
    assert np.isscalar(round_seed(1, "x", 1))


@pytest.mark.usefixtures("one_torch_thread")
def test_a_round_without_dp_is_reproducible(real_data_dir):
    """The same instructions and weights train to bitwise-equal weights (seeded masks, views and shuffling):
    what lets a validation study rerun a pretraining, and the benchmark cache one."""
    pretext = {"mae": 1.0, "contrastive": 1.0}
    site = Site("breast", "breastmnist", data_dir=str(real_data_dir))
    ins = RoundInstructions(round=1, seed=0, site=site, model=ModelSpec(preset="medformer_tiny_conv49"),
                            pretext=pretext, mask_ratio=0.75, privacy=None, data_dir=str(real_data_dir), device="cpu",
                            training=TrainingSpec(rounds=1, local_steps=3, batch_size=16))
    torch.manual_seed(0)
    model = build_pretext_model(make_config("medformer_tiny_conv49"), [("breastmnist", 28)], PretextObjective(pretext))
    received = model.state_dict()
    first, second = (train_round(ins, site, {k: v.clone() for k, v in received.items()}, ledger_state=None,
                                 optimizer_state=None).trained for _ in range(2))
    assert any(not torch.equal(first[k], received[k]) for k in received)
    assert all(torch.equal(first[k], second[k]) for k in first)
