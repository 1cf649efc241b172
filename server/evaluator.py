"""Centralized downstream evaluation of the aggregated encoder (the strategy's evaluate_fn).

For each dataset of the federation, the global encoder keys (inputs, latents, body) are loaded into
a Medformer with a fresh head and evaluated on the dataset's official splits: a linear probe always,
fine-tuning when configured, next to the ``random_init`` reference (same model, untrained encoder,
same probe), which is computed once per dataset and reused. A dataset whose files this server does
not have (a site's own imported images, a MedMNIST file missing here) is skipped, with a log line.

The models are evaluated on ``device``; the ``random_init`` reference stays on the CPU.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from flwr.app import ArrayRecord, MetricRecord

from config import dataset_label
from medformer.data import MissingFileError, load_splits
from medformer.eval import fine_tune, linear_probe, random_init_reference
from medformer.model import MedformerConfig, build_medformer

log = logging.getLogger(__name__)


class DownstreamEvaluator:
    """Callable ``(round, arrays) -> MetricRecord`` with the nested results kept in ``history``.

    Args:
        cfg: the Medformer architecture.
        datasets: (flag, size) pairs to evaluate.
        data_dir: where the MedMNIST files are.
        linear_probe, fine_tune: which methods to run (random_init always runs with the probe).
        fine_tune_epochs, label_fraction, max_train_examples: evaluation options.
        seed: probe / fine-tune seed.
        device: where the evaluated models compute.
    """

    def __init__(self, cfg: MedformerConfig, datasets: Sequence[tuple[str, int]], *,
                 data_dir: str | os.PathLike | None, linear_probe: bool = True, fine_tune: bool = False,
                 fine_tune_epochs: int = 5, label_fraction: float = 1.0, max_train_examples: int | None = None,
                 seed: int = 0, device: torch.device | str = "cpu"):
        self.cfg, self.datasets, self.data_dir = cfg, list(datasets), data_dir
        self.device = torch.device(device)
        self.skipped: dict[str, str] = {}  # dataset label -> why it is not evaluated here
        self.do_probe, self.do_fine_tune = linear_probe, fine_tune
        self.fine_tune_epochs, self.label_fraction = fine_tune_epochs, label_fraction
        self.max_train_examples, self.seed = max_train_examples, seed
        self._splits: dict[tuple[str, int], dict] = {}
        self._random: dict[str, dict] = {}
        self.history: dict[int, dict[str, dict[str, dict]]] = {}

    def splits(self, flag: str, size: int) -> dict:
        if (flag, size) not in self._splits:
            self._splits[(flag, size)] = load_splits(flag, size=size, data_dir=self.data_dir)
        return self._splits[(flag, size)]

    def evaluate_round(self, server_round: int, state: dict[str, torch.Tensor]) -> dict[str, dict[str, dict]]:
        """Nested ``{dataset: {method: {auc, acc, ...}}}`` for the global weights ``state``."""
        probe_kw = dict(label_fraction=self.label_fraction, max_train_examples=self.max_train_examples,
                        seed=self.seed)
        results: dict[str, dict[str, dict]] = {}
        for flag, size in self.datasets:
            label = dataset_label(flag, size)
            if label in self.skipped:
                continue
            try:
                splits = self.splits(flag, size)
            except MissingFileError as e:
                self.skipped[label] = str(e)
                log.warning("central evaluation of %s skipped: this server has no files for it (%s)", label, e)
                continue
            model = build_medformer(self.cfg, [(flag, size)], downstream_heads=True)
            encoder = {k: state[k] for k in model.encoder_keys()}
            missing = model.load_state_dict(encoder, strict=False).missing_keys
            if any(not k.startswith("outputs.") for k in missing):
                raise KeyError(f"global weights lack encoder keys for {label}: {missing[:3]}")
            model.to(self.device)
            out: dict[str, dict] = {}
            if self.do_probe:
                out["linear_probe"] = linear_probe(model, splits, flag, **probe_kw)
                if label not in self._random:
                    self._random[label] = random_init_reference(self.cfg, (flag, size), splits, **probe_kw)
                out["random_init"] = self._random[label]
            if self.do_fine_tune:
                out["fine_tune"] = fine_tune(model, splits, flag, epochs=self.fine_tune_epochs, **probe_kw)
            results[label] = {m: {k: v for k, v in r.items() if isinstance(v, (int, float))} for m, r in out.items()}
            log.info("round %d %s: %s", server_round, label,
                     ", ".join(f"{m} auc {r['auc']:.3f} acc {r['acc']:.3f}" for m, r in results[label].items()))
        self.history[server_round] = results
        return results

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        results = self.evaluate_round(server_round, arrays.to_torch_state_dict())
        return MetricRecord({f"{d}/{m}/{k}": float(v) for d, ms in results.items() for m, r in ms.items()
                             for k, v in r.items() if k in ("auc", "acc")})
