"""What one hospital sends in a round, measured by running the ClientApp on a crafted train message.

For each site, the server's train message is built as the ServerApp builds it (only the keys that
site uses, plus its round instructions), passed through the ClientApp object itself (so mods and
routing apply), and the reply is taken apart: every record, its type, every array's key, shape,
dtype and bytes. The table compares the reply's bytes with the whole global model of the
federation (all sites' keys) and with the site's own training images, which never leave it::

    python -m deploy.payload --data-dir ../shared/data/medmnist --preset default \\
        --site breastmnist@28 --site pneumoniamnist@28 --site adrenalmnist3d@28

The numbers in docs/deployment.md are this command's output (a test keeps them in sync).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ReplyReport:
    """One site's reply to a train message, taken apart."""

    site: str
    dataset: str
    size: int
    keys_expected: list[str]
    bytes_expected: int                  # sum of nbytes of the keys this site uses
    records: dict[str, str]              # record name -> record type (ArrayRecord, MetricRecord, ...)
    arrays: dict[str, tuple[list[int], str, int]] = field(default_factory=dict)  # key -> (shape, dtype, bytes)
    metrics: dict[str, float] = field(default_factory=dict)
    configs: dict[str, dict] = field(default_factory=dict)
    bytes_sent_by_server: int = 0
    global_bytes: int = 0
    global_keys: int = 0
    train_images_bytes: int = 0          # the site's training images (uint8), for comparison
    train_images_shape: list[int] = field(default_factory=list)
    train_images_dtype: str = ""

    @property
    def reply_bytes(self) -> int:
        return sum(b for _, _, b in self.arrays.values())


def _instructions(site, *, preset: str, local_steps: int, batch_size: int):
    from config import ModelSpec, Site, TrainingSpec
    from protocol import RoundInstructions

    return RoundInstructions(
        round=1, seed=0, site=Site(site.name, site.dataset, site.size), model=ModelSpec(preset=preset),
        pretext={"mae": 1.0, "rotation": 0.5}, mask_ratio=0.75,
        training=TrainingSpec(rounds=1, local_steps=local_steps, batch_size=batch_size, lr=1e-3, weight_decay=0.05),
    )


@contextlib.contextmanager
def task_identity(run_id: int = 1):
    """Flower messages need the identity of a running task: pose as the ServerApp of run ``run_id``."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def inspect_sites(sites, *, data_dir: str | os.PathLike, preset: str = "default", local_steps: int = 1,
                  batch_size: int = 32) -> list[ReplyReport]:
    """Run one round of the ClientApp for each site on its real data; report what the reply holds."""
    import torch
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

    from client.app import app as client_app
    from client.site import local_data, site_from_node_config
    from medformer.model import make_config
    from medformer.pretext import PretextObjective, build_pretext_model
    from protocol import ARRAYS, CONFIG, INSTRUCTIONS

    cfg = make_config(preset)
    objective = PretextObjective({"mae": 1.0, "rotation": 0.5}, mask_ratio=0.75)
    torch.manual_seed(0)
    global_state = build_pretext_model(cfg, [(s.dataset, s.size) for s in sites], objective).state_dict()
    global_arrays = {k: v.detach().numpy().copy() for k, v in global_state.items()}
    global_bytes = sum(a.nbytes for a in global_arrays.values())
    reports = []
    for node_id, site in enumerate(sites, start=1):
        keys = list(build_pretext_model(cfg, [(site.dataset, site.size)], objective).state_dict())
        sent = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(global_arrays[k])) for k in keys})
        ins = _instructions(site, preset=preset, local_steps=local_steps, batch_size=batch_size)
        with task_identity():
            msg = Message(content=RecordDict({ARRAYS: sent, CONFIG: ConfigRecord({INSTRUCTIONS: ins.to_json(),
                                                                                  "server-round": 1})}),
                          dst_node_id=node_id, message_type=MessageType.TRAIN)
        node_config = {"name": site.name, "dataset": site.dataset, "size": site.size, "data-dir": str(data_dir)}
        context = Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})
        with task_identity():
            reply = client_app(msg, context)
        if reply.has_error():
            raise RuntimeError(f"{site.name}: the ClientApp replied with an error: {reply.error.reason}")
        content = reply.content
        report = ReplyReport(
            site=site.name, dataset=site.dataset, size=site.size, keys_expected=keys,
            bytes_expected=sum(global_arrays[k].nbytes for k in keys),
            records={name: type(rec).__name__ for name, rec in content.items()},
            bytes_sent_by_server=sum(global_arrays[k].nbytes for k in keys),
            global_bytes=global_bytes, global_keys=len(global_arrays),
        )
        for name, rec in content.array_records.items():
            for k, arr in rec.items():
                a = arr.numpy()
                report.arrays[k if name == ARRAYS else f"{name}/{k}"] = (list(a.shape), str(a.dtype), int(a.nbytes))
        for name, rec in content.metric_records.items():
            report.metrics.update({(k if name == "metrics" else f"{name}/{k}"): v for k, v in rec.items()})
        for name, rec in content.config_records.items():
            report.configs[name] = dict(rec)
        images = local_data(site_from_node_config(node_config), 0).images
        report.train_images_bytes = int(np.asarray(images).nbytes)
        report.train_images_shape = list(np.asarray(images).shape)
        report.train_images_dtype = str(np.asarray(images).dtype)
        reports.append(report)
    return reports


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def table(reports: list[ReplyReport], preset: str) -> str:
    """Markdown table of the per-site reply sizes (what docs/deployment.md shows)."""
    g = reports[0]
    lines = [
        f"Model preset `{preset}`; global model of the federation ({', '.join(r.dataset for r in reports)}): "
        f"{g.global_keys} tensors, {g.global_bytes:,} bytes ({_kb(g.global_bytes)}).",
        "",
        "| site | dataset@size | tensors sent back | bytes sent back | share of global model "
        "| other records | site's training images (never sent) |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for r in reports:
        other = ", ".join(f"{n}: {t}" for n, t in r.records.items() if n != "arrays")
        metrics = f"{len(r.metrics)} scalars"
        lines.append(
            f"| {r.site} | {r.dataset}@{r.size} | {len(r.arrays)} | {r.reply_bytes:,} ({_kb(r.reply_bytes)}) "
            f"| {100 * r.reply_bytes / r.global_bytes:.1f}% | {other} ({metrics}) "
            f"| {r.train_images_bytes:,} ({'x'.join(map(str, r.train_images_shape))} {r.train_images_dtype}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from deploy.sites import parse_site

    p = argparse.ArgumentParser(prog="python -m deploy.payload", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("MEDMNIST_DATA"), help="MedMNIST folder")
    p.add_argument("--preset", default="default", help="model preset (tiny, default, base)")
    p.add_argument("--site", action="append", required=True, help="dataset@size (repeatable)")
    p.add_argument("--json", action="store_true", help="print the full reports as JSON instead of the table")
    args = p.parse_args(argv)
    try:
        sites = [parse_site(s) for s in args.site]
        if not args.data_dir or not os.path.isdir(args.data_dir):
            raise ValueError(f"--data-dir {args.data_dir!r} is not a folder (or set $MEDMNIST_DATA)")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reports = inspect_sites(sites, data_dir=args.data_dir, preset=args.preset)
    if args.json:
        print(json.dumps([{**vars(r), "reply_bytes": r.reply_bytes} for r in reports], indent=1))
    else:
        print(table(reports, args.preset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
