"""The model card (``README.md`` in the Hugging Face format) that export writes beside the weights.

It is built from what the checkpoint itself records — the run's resolved spec, step, tokens seen,
the spec hash and, for task stages, the best dev result — so it describes exactly the exported
weights: teacher, student shape and head count, the losses and their weights, the evaluation
results, and how to load it. The YAML front matter is what the Hub reads (library, tags, metrics).
"""

from __future__ import annotations

import json

from mlkd_scale.losses.presets import get_preset


def _loss_lines(spec: dict, stage: int) -> list[str]:
    losses = spec.get("losses") or {}
    name = losses.get("preset", "mlkd")
    try:
        preset = get_preset(name)
    except ValueError:
        return [f"- preset `{name}`"]
    given = losses.get("weights") or {}
    weights = {t: given.get(t, preset.default_weights.get(stage, {}).get(t, 1.0)) for t in preset.terms.get(stage, ())}
    shown = ", ".join(f"`{t}` × {w:g}" for t, w in weights.items() if w > 0) or "none"
    return [f"- preset `{name}`, stage {stage}: {shown}"]


def _flat(metrics: dict, prefix: str = "") -> dict[str, float]:
    """``{"validation": {"accuracy": 0.9}}`` -> ``{"validation/accuracy": 0.9}`` (numbers only)."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def model_card(client: dict, model, tag: str, results: dict | None = None) -> str:
    """README.md text for ``model`` (the exported student) from the checkpoint's client state;
    ``results`` (dev metrics) if given, else the best result the checkpoint recorded."""
    spec = client.get("spec") or {}
    config = model.config
    architecture = (config.architectures or [type(model).__name__])[0]
    stage = client.get("stage")
    stage_number = 2 if stage == "stage2" else 1
    teacher = (spec.get("teacher") or {}).get("path", "unknown")
    results = _flat(results if results is not None else (client.get("best") or {}).get("metrics") or {})
    front = ["---", "library_name: transformers", "tags:", "- knowledge-distillation", "- mlkd-bert"]
    if results:
        front += ["model-index:", f"- name: {spec.get('run', {}).get('name', 'student')}", "  results:"]
        front += ["  - metrics:"] + [f"    - name: {k}\n      type: {k}\n      value: {v}" for k, v in results.items()]
    front.append("---")
    task = (spec.get("task") or {}).get("name")
    lines = [
        *front,
        "",
        f"# {spec.get('run', {}).get('name', 'student')}: a student distilled with mlkd_scale",
        "",
        (f"Distilled from the teacher `{teacher}` with multi-level knowledge distillation "
        f"({'task distillation on ' + task + ', ' + str(stage) if task else 'general distillation'})."),
        "",
        "| | |",
        "|---|---|",
        f"| teacher | `{teacher}` |",
        (f"| student | {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"**{config.num_attention_heads} attention heads**, FFN {config.intermediate_size}, "
        f"{model.num_parameters() / 1e6:.1f} M parameters (`{architecture}`) |"),
        f"| checkpoint | `{tag}`, optimizer step {client.get('step', '?')} |",
        f"| tokens seen | {client.get('tokens_seen', 'n/a')} |",
        f"| spec hash | `{client.get('spec_hash', 'n/a')}` |",
        "",
        "## Losses",
        "",
        *_loss_lines(spec, stage_number),
        "",
        "## Evaluation",
        "",
        (json.dumps(results, indent=1) if results else "No evaluation was recorded in this checkpoint."),
        "",
        "## How to load",
        "",
        "```python",
        f"from transformers import AutoTokenizer, {architecture}",
        "",
        f'model = {architecture}.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "```",
        "",
        "The run's resolved spec:",
        "",
        "```json",
        json.dumps(spec, indent=1, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)


ONNX_HEADING = "## ONNX"


def with_onnx_section(card: str, check: dict) -> str:
    """``card`` with an ONNX section (the file, its inputs and the onnxruntime check) before "How to
    load", replacing an earlier one, so the card says what was checked and how well."""
    diffs = ", ".join(f"`{k}` {v if isinstance(v, str) else f'{v:.2e}'}" for k, v in check["max_abs_diff"].items())
    section = [
        ONNX_HEADING,
        "",
        (f"`{check['onnx_file']}` (opset {check['opset']}, `{check['exporter']}`): inputs "
         f"{', '.join(f'`{n}`' for n in check['inputs'])}, dynamic batch and sequence axes. Checked against "
         f"the PyTorch model with onnxruntime {check['versions']['onnxruntime']} on inputs of shapes "
         f"{', '.join('×'.join(map(str, s)) for s in check['check_shapes'])} (padded rows included): "
         f"max abs difference {diffs}; tolerance {check['tolerance_abs']:g}, "
         f"{'passed' if check['passed'] else 'FAILED'} (`onnx_check.json`)."),
        "",
    ]
    lines = card.split("\n")
    if ONNX_HEADING in lines:  # drop the old section: up to the next heading
        start = lines.index(ONNX_HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines = lines[:start] + lines[end:]
    at = lines.index("## How to load") if "## How to load" in lines else len(lines)
    return "\n".join(lines[:at] + section + lines[at:])
