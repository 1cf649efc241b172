"""Model cards (README.md of an exported model): what it was trained on, by whom, how well it does,
what it is for and what it is not for (Mitchell et al. 2019, "Model Cards for Model Reporting")."""
from __future__ import annotations

from typing import Any

from medformer.data import get_info

LIMITS = [
    "Research software: not a medical device, not validated for diagnosis or treatment decisions.",
    "Trained and evaluated on small images (MedMNIST's 28 or 64 pixels per side, resized as MedMNIST resizes); "
    "other sizes, modalities or scanners need their own validation.",
    "Downstream numbers are on the public test splits named above, one seed; BreastMNIST's 156 test images "
    "alone spread about +/-0.024 AUC between seeds.",
    "Differential privacy (where a site used it) bounds what the released weights say about any one training "
    "image at that site, at the epsilon and delta shown; sites without DP are not protected that way, and no "
    "secure aggregation hid individual updates from the coordinator.",
    "A self-supervised encoder learns what its pretext tasks reward; it carries the sites' biases (populations, "
    "devices, label definitions).",
]


def _fmt(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else ("-" if v is None else str(v))


def privacy_text(client: dict[str, Any]) -> str:
    """A site's privacy as people read it: its epsilon and delta, or "no DP"."""
    if client.get("epsilon") is None:
        return "no DP"
    text = (f"DP-SGD: epsilon {client['epsilon']:.3g} at delta {client['delta']:.3g} "
            f"({client.get('accountant', '?')}, clip {client.get('max_grad_norm', '?')}, "
            f"noise {_fmt(client.get('noise_multiplier'), 3)})")
    if client.get("site_policy"):
        text += f"; site policy: {client['site_policy']}"
    return text


def downstream_table(downstream: dict[str, dict[str, dict]]) -> list[str]:
    """| dataset | <method> AUC | <method> ACC | ... (4 decimals), as summary.json's ``downstream``."""
    methods = sorted({m for ms in downstream.values() for m in ms})
    head = "| dataset | " + " | ".join(f"{m} AUC | {m} ACC" for m in methods) + " |"
    lines = [head, "|---|" + "---|---|" * len(methods)]
    for d, ms in downstream.items():
        cells = [f"{_fmt(ms[m]['auc'])} | {_fmt(ms[m]['acc'])}" if m in ms else "- | -" for m in methods]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return lines


def scopes_table(scopes: dict[str, dict[str, int]]) -> list[str]:
    lines = ["| scope | tensors | values | shared by |", "|---|---|---|---|"]
    for scope, s in scopes.items():
        kind, _, what = scope.partition(".")
        who = {"body": "every site", "inputs": f"the sites with {what} images", "latents": f"the {what} sites",
               "outputs": f"task {what}", "probes": f"linear probe for {what}"}.get(kind, "-")
        lines.append(f"| `{scope}` | {s['tensors']} | {s['values']} | {who} |")
    return lines


def architecture_lines(config: dict[str, Any]) -> list[str]:
    fields = ", ".join(f"{k}={v}" for k, v in config["model"].items())
    datasets = ", ".join(f"{d['flag']}@{d['size']} ({d['input_kind']})" for d in config["datasets"])
    return [f"- architecture: Medformer, preset `{config['preset']}` ({fields})",
            f"- tokenizers and latents for: {datasets}",
            f"- weights: `model.safetensors` ({config['weights']['tensors']} tensors, {config['weights']['values']} values, "
            f"SHA-256 {config['weights']['sha256']})"]


def use_lines(model_dir_hint: str, dataset_hint: str) -> list[str]:
    return ["## Use it", "", "```bash",
            f"medfl finetune {model_dir_hint} --dataset {dataset_hint} --out finetuned   # or --linear-probe",
            f"medfl predict finetuned --dataset {dataset_hint} --split test --out preds.csv",
            "```", "", "```python", "import medformer",
            f"model = medformer.load_pretrained({model_dir_hint!r})       # pure PyTorch; device='cuda' for a GPU",
            f"features = model.probe_features(images, {dataset_hint!r})  # [B, C, H, W] in [-1, 1] -> [B, depth * dim]",
            "```", ""]


def federation_card(*, config: dict[str, Any], scenario: dict[str, Any], state: dict[str, Any], round_: int,
                    downstream: dict | None, downstream_round: int | None, client_dp: dict | None,
                    run_dir: str, checkpoint: str) -> str:
    """The card of an encoder exported from a federation's checkpoint."""
    clients = state.get("clients", {})
    sites = sorted(clients)
    pretext = scenario["pretext"]
    tr = scenario["training"]
    lines = [f"# Medformer encoder: federation `{scenario['name']}`, round {round_} of {scenario['training']['rounds']}",
             "",
             f"A Medformer pretrained by federated self-supervised learning (Flower) across {len(sites)} site(s) that "
             f"never pooled their images; exported by `medfl export` from `{run_dir}` (`{checkpoint}`).", "",
             "## Model", "", *architecture_lines(config), "",
             "## Training data (each site's own, never shared)", "",
             "| site | dataset | modality | task | image size | training images | rounds trained | privacy |",
             "|---|---|---|---|---|---|---|---|"]
    for name in sites:
        c = clients[name]
        flag = c.get("dataset")
        info = get_info(flag)
        lines.append(f"| {name} | {flag} | {info.modality} | {info.task} | {c.get('size', 28)} | "
                     f"{c.get('num_examples')} | {c.get('rounds_trained', 0)} | {privacy_text(c)} |")
    weights = ", ".join(f"{t} (weight {w:g})" for t, w in pretext.items())
    lines += ["", "## Federation", "",
              f"- sites: {len(sites)}; rounds: {round_} of {tr['rounds']} planned",
              f"- strategy: {scenario['strategy']['name']}; local training per round: "
              f"{tr['local_steps'] if tr.get('local_steps') else str(tr['local_epochs']) + ' epoch(s)'}"
              f"{' steps' if tr.get('local_steps') else ''}, batch {tr['batch_size']}, lr {tr['lr']:g}, {tr['optimizer']}",
              f"- pretext tasks: {weights}; mask ratio {scenario['mask_ratio']:g}",
              "- client-level DP: " + (f"epsilon {client_dp['epsilon']:.3g} at delta {client_dp['delta']:.3g}"
                                        if client_dp and client_dp.get('epsilon') is not None else "none"),
              f"- sites dropped in some round: {', '.join(sorted({d['site'] for d in state.get('dropouts', [])})) or 'none'}",
              ""]
    if downstream:
        lines += [f"## Downstream evaluation (round {downstream_round}; central, official MedMNIST metrics, test split)",
                  "", "The run's `summary.json` table: `linear_probe` = a logistic regression on the frozen "
                  "encoder's features (every body block's pooled tokens; C chosen on val), `random_init` = the same "
                  "probe on an untrained Medformer, `fine_tune` = end-to-end (epoch chosen on val).", "", *downstream_table(downstream), ""]
    else:
        lines += ["## Downstream evaluation", "", f"The run did not evaluate round {round_} centrally.", ""]
    lines += ["## What the model holds (sharing scopes)", "", *scopes_table(config["scopes"]), "",
              "## Intended use", "",
              "Embedding and fine-tuning on medical images like the sites' (same modality, size and channels), "
              "at a site that has its own labelled cases: `medfl finetune` (or a linear probe), then "
              "`medfl predict`. New datasets get a fresh tokenizer, latents and head.", "",
              "## Limits", "", *[f"- {x}" for x in LIMITS], "",
              *use_lines("MODEL_DIR", next(iter(clients.values()), {}).get("dataset", "breastmnist"))]
    return "\n".join(lines)


def finetune_card(*, config: dict[str, Any], base: dict[str, Any], base_dir: str, dataset: str, size: int,
                  metrics: dict[str, Any]) -> str:
    """The card of a model fine-tuned (or linearly probed) at one site."""
    info = get_info(dataset)
    method = metrics["method"]
    lines = [f"# Medformer {'linearly probed' if method == 'linear_probe' else 'fine-tuned'} on {dataset}", "",
             f"From the exported model `{base_dir}` ({base.get('source', {}).get('kind', 'model')}: "
             f"{base.get('source', {}).get('scenario', '-')}), by `medfl finetune` at one site on its own labelled "
             f"splits of {dataset} ({info.modality}, {info.task}, {size} pixels).", "",
             "## Model", "", *architecture_lines(config), "",
             "## Result (official MedMNIST metrics; selection on val, test scored once)", "",
             "| split | AUC | ACC |", "|---|---|---|",
             f"| val | {_fmt(metrics['val_auc'])} | {_fmt(metrics['val_acc'])} |",
             f"| test | {_fmt(metrics['auc'])} | {_fmt(metrics['acc'])} |", "",
             f"- method: {method}; labelled training images: {metrics['n_train']} (label fraction "
             f"{metrics['label_fraction']:g}); seed {metrics['seed']}; device {metrics['device']}",
             f"- new to the encoder: {', '.join(f'{k} ({v} tensors)' for k, v in metrics['new_parts'].items()) or 'nothing'}",
             "",
             "## Intended use", "", f"Scoring {dataset}-like images at this site (`medfl predict`).", "",
             "## Limits", "", *[f"- {x}" for x in LIMITS], "", *use_lines("MODEL_DIR", dataset)]
    return "\n".join(lines)
