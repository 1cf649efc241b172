"""The empirical privacy audit of a finished run (``evaluation.audit``): a calibrated membership-
inference attack (``medformer.dp.audit``) on the final global model, one per site."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from config import Scenario, Site
from medformer.data import MedMNISTSplit, partition_indices
from medformer.dp.audit import membership_audit
from medformer.model import MedformerConfig
from medformer.pretext import PretextObjective, build_pretext_model

log = logging.getLogger("medfl.server")


def audit_sites(scenario: Scenario, cfg: MedformerConfig, objective: PretextObjective, sites: list[Site], *,
                final: dict[str, np.ndarray], initial: dict[str, np.ndarray],
                splits: Callable[[str, int], dict[str, MedMNISTSplit]]) -> dict[str, dict]:
    """Attack AUC and TPR at 1% FPR per site: members are the site's own training images, non-members
    its dataset's validation images; the untrained initial model calibrates the attack (it saw none).

    Args:
        final: the released global arrays; initial: the round-0 global arrays.
        splits: (flag, size) -> the dataset's train/val/test splits.
    """
    threads = torch.get_num_threads()
    # A few threads at most: on a shared CPU, more OpenMP threads than free cores make these small
    # forward passes many times slower, not faster.
    torch.set_num_threads(max(1, min(threads, scenario.simulation.threads_per_client)))
    out: dict[str, dict] = {}
    try:
        for site in sorted(sites, key=lambda s: s.name):
            t0 = time.monotonic()
            model = build_pretext_model(cfg, [(site.dataset, site.size)], objective)
            reference = build_pretext_model(cfg, [(site.dataset, site.size)], objective)
            keys = list(model.state_dict())
            model.load_state_dict({k: torch.from_numpy(np.array(final[k])) for k in keys})
            reference.load_state_dict({k: torch.from_numpy(np.array(initial[k])) for k in keys})
            split = splits(site.dataset, site.size)
            members = split["train"]
            if site.partitioned:
                parts = partition_indices(members.labels, site.partition_parts, site.partition_method or "iid",
                                          site.partition_alpha or 0.5, scenario.seed)
                members = members.subset(parts[site.partition_index])
            # Non-members: the validation split, carved from the same source as the training split. A test
            # split can come from elsewhere (PneumoniaMNIST's does): on one non-private quickstart model the
            # attack scored AUC 0.40 against test images but 0.49 against validation images, i.e. it
            # measured the shift between splits, not membership.
            result = membership_audit(model, objective, members=members, non_members=split["val"],
                                      dataset=site.dataset, reference=reference,
                                      max_examples=scenario.evaluation.audit_examples, seed=scenario.seed)
            out[site.name] = result.to_dict()
            log.info("audit %s: membership attack AUC %.3f (loss only %.3f), TPR@1%%FPR %.3f, %d+%d images, %.1f s",
                     site.name, result.auc, result.loss_auc, result.tpr_at_1pct_fpr, result.members,
                     result.non_members, time.monotonic() - t0)
    finally:
        torch.set_num_threads(threads)
    return out
