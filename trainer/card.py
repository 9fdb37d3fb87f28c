"""Model cards: what a shipped model is, where it came from, and how well it does, in Markdown.

Written with every export, beside the ONNX file: the contract (version, codec, classes, latents,
training-data hash), the classifier's DS2 table beside published rows, and for the generator the
fidelity table (DS2 real beats as reference) with the seed paper's image baseline beside it and a
PNG of real and generated beats per class.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edge.models import CLASSIFIER, ModelContract
from edge.records import DS1

log = logging.getLogger(__name__)


def _contract_lines(contract: ModelContract, onnx_path: Path, parity: float) -> list[str]:
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    lines = [
        f"- file: `{onnx_path.name}` (SHA-256 `{digest}`)",
        f"- kind: {contract.kind}, version {contract.version}",
        f"- codec: version {contract.codec.version}, {contract.codec.fs:g} Hz, "
        f"{contract.codec.pre} samples before and {contract.codec.post} from the R-peak",
        f"- classes: {', '.join(contract.classes)}; RR inputs: {', '.join(contract.rr_features)} (seconds)",
    ]
    if contract.persona_dim:
        lines.append(f"- latents: persona {contract.persona_dim}, per beat {contract.beat_dim}")
    lines += [
        f"- trained on records: {contract.extra.get('training.records', '?')}"
        f"{' (DS1)' if contract.extra.get('training.records') == ','.join(DS1) else ''}, "
        f"data hash `{contract.data_hash}`",
        f"- training time: {contract.extra.get('training.fit_seconds', '?')} s",
        f"- ONNX vs torch on random inputs: max abs error {parity:.2e}",
    ]
    return lines


def classifier_section(evaluation: dict[str, Any], selection: list[dict[str, Any]] = ()) -> str:
    """The DS2 table and confusion matrix; ``selection``: the run's restart and out-of-fold log rows."""
    from trainer.classifier import classification_table

    chosen = [r for r in selection if r.get("phase") == "out-of-fold"]
    restarts = [r for r in selection if r.get("phase") == "restart"]
    picked = ""
    if chosen:
        c = chosen[-1]
        scores = ", ".join(f"{r['val_macro_f1']:.3f}" for r in restarts)
        picked = (
            "### Selection (DS1 only)\n\n"
            + (f"{len(restarts)} ensembles trained (restarts); out-of-fold DS1 macro F1 (N, S, V, F) of each: "
               f"{scores}; kept restart {int(c.get('restart', 0))}. " if restarts else "")
            + f"Its out-of-fold DS1 figures: macro F1 {c['val_macro_f1']:.3f}, S F1 {c.get('val_f1_S', 0):.3f}, "
            f"V F1 {c.get('val_f1_V', 0):.3f}; logit bias {c.get('logit_bias')}. DS2 below chose nothing.\n\n"
        )

    cm = np.asarray(evaluation["confusion"])
    classes = evaluation["classes"]
    conf = ["| reference \\ predicted | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
    conf += [f"| {c} | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(classes, cm)]
    return picked + (
        "### Beat classification, inter-patient (measured on records the model never saw: "
        f"{', '.join(evaluation.get('records', [])) or 'DS2'})\n\n"
        f"{classification_table(evaluation)}\n\n"
        f"Accuracy {100 * evaluation['accuracy']:.1f} %, macro F1 {evaluation['macro_f1']:.3f} over "
        f"{evaluation['n']} DS2 beats. Confusion matrix:\n\n" + "\n".join(conf) + "\n"
    )


def generator_section(
    generator: Any,
    baseline: Any | None,
    train_records: list[str],
    eval_records: list[str],
    data_dir: str | None,
    cache_dir: str | None,
    png_path: Path,
    seed: int = 0,
) -> tuple[str, dict[str, Any]]:
    """Fidelity of the generator (and the image baseline) against DS2 real beats, and the PNG."""
    from trainer.dataset import load_records
    from trainer.fidelity import fidelity_report, fidelity_table, plot_real_vs_generated
    from trainer.generator import surrogate_set

    train = load_records(train_records, data_dir, cache_dir)
    test = load_records(eval_records, data_dir, cache_dir)
    rng = np.random.default_rng(seed)
    generated = {"1-D GAN": (surrogate_set(generator, test, rng), test.labels)}
    if baseline is not None:
        generated["image baseline"] = (baseline.sample(test.labels, rng), test.labels)
    report = fidelity_report(test, train, generated, seed=seed)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    plot_real_vs_generated(test, generated, png_path, seed=seed)
    text = (
        "### Fidelity (DS2 real beats as reference; one surrogate per DS2 beat, same class and RR, "
        "one persona per DS2 record)\n\n"
        f"{fidelity_table(report)}\n\n![real and generated beats per class]({png_path.name})\n"
    )
    return text, report


def write_card(
    path: Path,
    title: str,
    contract: ModelContract,
    onnx_path: Path,
    parity: float,
    body: str,
    command: str,
) -> None:
    text = [f"# Model card: {title}", "", *_contract_lines(contract, onnx_path, parity), "",
            f"Reproduce: `{command}`", "", body.rstrip(), ""]
    if contract.kind == CLASSIFIER and "metrics.ds2" in contract.extra:
        text += ["Headline metrics in the model metadata (`metrics.ds2`): "
                 f"`{json.dumps(json.loads(contract.extra['metrics.ds2']))}`", ""]
    path.write_text("\n".join(text))
    log.info("wrote model card %s", path)
