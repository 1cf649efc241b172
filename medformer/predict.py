"""Scores of an exported Medformer (fine-tuned, or carrying a linear probe) for a whole split or an
array of images, in ``medmnist.evaluator``'s ``y_score`` format, and the CSV ``medmnist.Evaluator``
writes (one row per image: its index, then one score per column, no header).

The scores are computed as the evaluation that reported the model's metrics computed them
(``medformer.eval``: the head's scores in eval mode, or the probe on its features), so the
official metrics of a saved CSV are the reported ones.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from medformer.data import DataError, FormatError, MedMNISTSplit, get_info
from medformer.data.files import _expected_image_shape, _to_split
from medformer.eval.features import extract_features, predict_scores
from medformer.model import Medformer
from medformer.pretrained import probes_of

#: Batch sizes of the evaluation code (fine_tune scores with max(batch_size, 256); linear_probe embeds with 512).
HEAD_BATCH, PROBE_BATCH = 256, 512


def head_kind(model: Medformer, dataset: str) -> str | None:
    """``linear_probe``, ``task`` (a downstream head) or None: how ``model`` scores ``dataset``."""
    if dataset in probes_of(model):
        return "linear_probe"
    if dataset in model.infos and dataset in model.outputs:
        return "task"
    return None


def score_split(model: Medformer, split: MedMNISTSplit, dataset: str, *, batch_size: int | None = None) -> np.ndarray:
    """float64 ``(N, C)`` scores of every image of ``split`` (the model is left in eval mode)."""
    kind = head_kind(model, dataset)
    if kind is None:
        raise DataError(f"the model has no head for {dataset}: fine-tune it first "
                        f"(medfl finetune MODEL_DIR --dataset {dataset})")
    model.eval()
    if kind == "linear_probe":
        probe = probes_of(model)[dataset]
        if probe.weight.shape[1] != model.probe_dim:  # fitted on another read-out (before every block was read)
            raise DataError(f"the {dataset} linear probe reads {probe.weight.shape[1]} features but this model's "
                            f"probe features have {model.probe_dim}; refit it (medfl finetune MODEL_DIR --dataset "
                            f"{dataset} --linear-probe)")
        return probe.scores(extract_features(model, split, dataset, batch_size=batch_size or PROBE_BATCH))
    return predict_scores(model, split, dataset, get_info(dataset).task, batch_size=batch_size or HEAD_BATCH)


def images_split(path: str | os.PathLike, dataset: str, size: int) -> MedMNISTSplit:
    """The images of an npz (key ``images``, uint8, in the dataset's format at ``size``) as a split."""
    path = Path(path)
    info = get_info(dataset)
    shape = _expected_image_shape(info, size)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "images" not in npz.files:
                raise FormatError(f"{path} has no 'images' array (has: {', '.join(npz.files) or 'none'})")
            images = npz["images"]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise FormatError(f"{path} is not a readable npz of images ({type(e).__name__}: {e})") from None
    except AttributeError:
        raise FormatError(f"{path} is a single .npy array, not an npz with an 'images' array") from None
    if images.dtype != np.uint8 or tuple(images.shape[1:]) != shape:
        raise FormatError(f"{path}: images are {images.dtype} {tuple(images.shape)}, expected uint8 "
                          f"(N, {', '.join(map(str, shape))}) for {dataset} at size {size}")
    return _to_split(dataset, "images", size, info, images, np.zeros((len(images), 1), dtype=np.uint8))


def scores_csv(scores: np.ndarray) -> str:
    """The CSV text ``medmnist.Evaluator`` writes and ``parse_and_evaluate`` reads: ``index,score_0,...``
    per row, no header, every float written exactly (``repr``)."""
    rows = [",".join([str(i), *(repr(float(v)) for v in row)]) for i, row in enumerate(np.asarray(scores))]
    return "\n".join(rows) + "\n"


def read_scores_csv(path: str | os.PathLike) -> np.ndarray:
    """Scores back from such a CSV, in index order."""
    rows = [line.split(",") for line in Path(path).read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: int(r[0]))
    return np.array([[float(v) for v in r[1:]] for r in rows], dtype=np.float64)
