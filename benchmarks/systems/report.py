"""systems.json / systems.md: every part's results, its provenance and the targets."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any


from benchmarks.common import (fmt_bytes, fmt_seconds, header_lines, md_table, now, write_result)

log = logging.getLogger("benchmarks.systems")

PARTS = ("flops", "overhead", "scale", "comm")  # comm last: it checks against the overhead run
TARGET_OVERHEAD = 1.15
TARGET_SCALE_GIB = 8.0



def _provenance(part: dict[str, Any]) -> str:
    return (f"_Measured {part['measured_at']} by `{part['command']}` in {fmt_seconds(part['wall_seconds'])}; "
            f"load average {part['load_average_before']} → {part['load_average_after']}._")


def render_markdown(payload: dict[str, Any]) -> str:
    lines = ["# Systems performance", ""] + header_lines(payload) + [""]
    p = payload["parts"]
    if "flops" in p:
        f = p["flops"]
        lines += [f"## Compute efficiency of the pretext step (model `{f['model']}`)", "", _provenance(f), "",
                  f"Masked reconstruction + rotation, batch {f['batch']}; per thread count, {f['trials']} interleaved "
                  "trials of (fp32 2048^3 torch.matmul, 2D step, 3D step): the matmul peak is measured in the same "
                  "run, under the same load.", ""]
        rows = []
        for t, r in f["by_threads"].items():
            for k, c in r["cases"].items():
                rows.append([t, k.upper(), c["dataset"], f"{c['parameters']:,}", f"{c['flops_per_image'] / 1e6:.1f}",
                             f"{c['images_per_second_best']:.0f} / {c['images_per_second_median']:.0f}",
                             f"{c['gflops_best']:.1f} / {c['gflops_median']:.1f}",
                             f"{r['matmul_peak']['gflops']:.1f} / {r['matmul_peak']['gflops_median']:.1f}",
                             f"**{c['fraction_of_peak_best']:.0%}** / {c['fraction_of_peak_median']:.0%}"])
        lines += [md_table(["threads", "input", "dataset", "parameters", "MFLOP / image (fwd+bwd)",
                            "images/s (best / median)", "GFLOP/s (best / median)", "matmul peak GFLOP/s (best / median)",
                            "of peak (best / median)"], rows), "",
                  f['flop_counting'] + ". Best = the least-disturbed trial (each side of the fraction its own best); "
                  "median = typical on this shared machine. With 2 threads on a busy CPU, one descheduled thread "
                  "stalls the other at every parallel region: the 1-thread numbers are the reproducible ones.", ""]
    if "overhead" in p:
        o = p["overhead"]
        lines += ["## Federation overhead", "", _provenance(o), "",
                  f"Quickstart (3 hospitals, model `{o['model']}`, {o['local_steps']} local steps x batch 128 each "
                  f"= {o['images_per_round']} images per round), {o['rounds']} rounds, rounds {o['rounds_compared']} "
                  f"compared, {o['repeats']} alternations. {o['engine']}.", ""]
        rows = []
        for i, r in enumerate(o["runs"]):
            for key, name in (("flower", "`medfl run` (Flower)"),
                              ("bare_parallel", f"bare, {o['workers']} processes"),
                              ("bare_sequential", f"bare, sequential ({o['sequential_threads']} threads)")):
                x = r[key]
                rows.append([i + 1, name, f"{x['mean_round_seconds']:.2f}", f"{x['mean_compute_floor_seconds']:.2f}",
                             f"{x['round_over_floor']:.2f}",
                             ", ".join(f"{y['seconds']:.1f}" for y in x["rounds"]),
                             f"{x['load_average_before']} → {x['load_average_after']}"])
        lines += [md_table(["run", "how", "s / round", "train_local floor (s)", "round / floor", "all rounds (s)",
                            "load average"], rows), ""]
        lines += [f"Summary over the {o['repeats']} alternations (median of each alternation's ratio):", ""]
        rows = [["vs bare, parallel (like for like)", f"**{o['normalised_ratio_vs_bare_parallel']:.2f}x**",
                 f"{o['raw_ratio_vs_bare_parallel']:.2f}x"],
                [f"vs bare, sequential ({o['sequential_threads']} threads)",
                 f"{o['normalised_ratio_vs_bare_sequential']:.2f}x", f"{o['raw_ratio_vs_bare_sequential']:.2f}x"]]
        lines += [md_table(["Flower round / bare round", "normalised", "raw"], rows), "",
                  f"Target ≤ {TARGET_OVERHEAD}x: normalised "
                  f"**{'met' if o['normalised_ratio_vs_bare_parallel'] <= TARGET_OVERHEAD else 'missed'}**, raw "
                  f"**{'met' if o['raw_ratio_vs_bare_parallel'] <= TARGET_OVERHEAD else 'missed'}**. {o['note']}", ""]
    if "scale" in p:
        s = p["scale"]
        r = s["run"]
        ok = r["exit_code"] == 0 and s["peak_pss_bytes"] is not None
        lines += ["## Scale: 100 simulated hospitals", "", _provenance(s), "",
                  f"`{r['command']}`: exit code {r['exit_code']}, {len(s['round_seconds'])} of {s['rounds_planned']} "
                  f"rounds, clients sampled per round {s['sampled_per_round']}, wall {fmt_seconds(r['wall_seconds'])}; "
                  f"load average {r['load_average_before']} → {r['load_average_after']}.", ""]
        rows = [["seconds per round", ", ".join(f"{x:.1f}" for x in s["round_seconds"]),
                 f"median {s['median_round_seconds']:.1f}" if s["median_round_seconds"] else "—"],
                ["peak memory, process tree (PSS)", fmt_bytes(s["peak_pss_bytes"]),
                 f"target ≤ {TARGET_SCALE_GIB:g} GB: "
                 + ("**met**" if ok and s["peak_pss_bytes"] <= TARGET_SCALE_GIB * 1e9 else "**missed**")],
                ["peak memory, process tree (RSS sum)", fmt_bytes(s["peak_rss_bytes"]),
                 f"{r.get('memory', {}).get('peak_processes', '?')} processes at most"]]
        lines += [md_table(["measure", "value", "note"], rows), "", s["note"], ""]
    if "comm" in p:
        c = p["comm"]
        lines += ["## Communication per hospital per round (five-hospitals, default model, float32)", "", _provenance(c), ""]
        rows = [[n, h["dataset"], h["keys"], fmt_bytes(h["received_per_round"]), fmt_bytes(h["sent_per_round"]),
                 fmt_bytes(h["whole_model_bytes"]), f"{h['fraction_of_whole']:.0%}"] for n, h in c["hospitals"].items()]
        lines += [md_table(["hospital", "dataset", "keys", "receives", "sends", "whole model (each way)",
                            "keyed / whole"], rows), "",
                  f"All five together per round: {fmt_bytes(c['round_total_keyed_bytes'])} keyed vs "
                  f"{fmt_bytes(c['round_total_whole_bytes'])} whole-model ({c['round_saving']:.0%} less). "
                  f"{c['method']}."]
        chk = c.get("check_against_flower_run")
        if chk:
            lines += ["", "Check against the bytes the Flower strategy logged in the overhead run (quickstart): "
                      + ", ".join(f"{n} {v['logged_bytes_sent']} logged = {v['computed']} computed: {v['equal']}"
                                  for n, v in chk.items()) + "."]
        lines += [""]
    return "\n".join(lines)



def write_results(out: Path, results: dict[str, Any], machine: dict[str, Any], t_start: float) -> None:
    ordered = {k: results[k] for k in PARTS if k in results}
    commands = list(dict.fromkeys(r["command"] for r in ordered.values()))
    payload = {"benchmark": "systems", "machine": machine, "command": "`; `".join(commands),
               "wall_seconds": sum(r["wall_seconds"] for r in ordered.values()),
               "this_invocation_seconds": time.perf_counter() - t_start, "finished_at": now(),
               "seeds": [0], "seed_note": "the scenarios' seed 0 (medfl runs and bare loops); generator seed 0 (flops)",
               "parts": ordered,
               "targets": _targets(ordered)}
    write_result(out, "systems", payload, render_markdown(payload))


def _targets(p: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    if "overhead" in p:
        for kind in ("normalised", "raw"):
            r = p["overhead"][f"{kind}_ratio_vs_bare_parallel"]
            out.append({"target": f"federation overhead <= {TARGET_OVERHEAD}x bare local training ({kind})",
                        "value": r, "margin": TARGET_OVERHEAD - r, "status": "met" if r <= TARGET_OVERHEAD else "missed"})
    if "scale" in p and p["scale"].get("peak_pss_bytes") is not None:
        gb = p["scale"]["peak_pss_bytes"] / 1e9
        ok = p["scale"]["run"]["exit_code"] == 0
        out.append({"target": f"100 simulated hospitals within {TARGET_SCALE_GIB:g} GB", "value": gb,
                    "margin": TARGET_SCALE_GIB - gb, "status": "met" if ok and gb <= TARGET_SCALE_GIB else "missed"})
    return out
