"""How long to train the generator: membership inference and fidelity against training steps,
measured on DS1 subjects held out of training (never on DS2, which is for measurement only).

A GAN trained on 22 people first learns what ECG beats look like and then, given more steps, the
beats of those 22 people. The second part is what a membership-inference attacker exploits (is
this person's beat in the training set?), so the training length is a privacy setting, chosen
here the way any hyper-parameter is: on a split of the training records. The generator trains on
DS1 minus ``hold_out``; after each of ``steps`` it is measured on

* membership AUC: training-subject beats (members) against held-out-subject beats (non-members),
  scored by their distance to the nearest generated beat (``trainer.evaluate.generator_membership_draws``,
  the attack of ``ecg-trainer evaluate``), with a class-mean "generator" on the same split as the
  no-memory reference (it shows how much of the AUC is the two groups simply being different people);
* fidelity against the held-out subjects' real beats (Fréchet distance per class, TSTR), the same
  measures as the model card.

``ecg-trainer memorisation`` writes the table to docs/evaluation/memorisation.md and .json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge.records import AAMI_CLASSES, DS1

log = logging.getLogger(__name__)

#: Default held-out subjects: the first classifier fold of DS1 (S, V, bundle branch block and
#: normal records; see trainer.classifier.DS1_FOLDS).
HOLD_OUT = ("209", "106", "118", "112", "115", "230")
STEPS = (500, 1000, 1500, 2000, 3000, 5000)


def sweep(
    data_dir: str | None,
    output: str | Path,
    hold_out: Sequence[str] = HOLD_OUT,
    steps: Sequence[int] = STEPS,
    runs_dir: str = "runs",
    cache_dir: str | None = ".cache/beats",
    seed: int = 0,
    overrides: Sequence[str] = (),
    train_records: Sequence[str] | None = None,
    membership_draws: int = 10,
) -> dict[str, Any]:
    """Train one generator on DS1 minus ``hold_out`` (or on ``train_records``) and measure it
    after each of ``steps``; the membership AUCs are means over ``membership_draws`` attack draws."""
    from trainer.dataset import load_records
    from trainer.evaluate import generator_membership_draws
    from trainer.fidelity import fidelity_report
    from trainer.generator import surrogate_set
    from trainer.peer import torch_generate
    from trainer.pipeline import fit_options
    from trainer.runs import Run
    from trainer.tasks import TASKS, resolve_config

    unknown = sorted(set(hold_out) - set(DS1))
    if unknown:
        raise ValueError(f"hold-out records must be DS1 records (DS2 is for measurement); not in DS1: {', '.join(unknown)}")
    train_records = tuple(train_records or (r for r in DS1 if r not in set(hold_out)))
    if set(train_records) & set(hold_out):
        raise ValueError(f"records both trained on and held out: {', '.join(sorted(set(train_records) & set(hold_out)))}")
    train = load_records(train_records, data_dir, cache_dir)
    held = load_records(tuple(hold_out), data_dir, cache_dir)
    task = TASKS["generator"]
    base = resolve_config(task, list(overrides), seed)
    run = Run.start(runs_dir, "generator-holdout", fit_options(task, base, {
        "data_dir": data_dir, "seed": seed, "train_records": list(train_records), "eval_records": list(hold_out)}))
    templates = np.stack([train.beats[train.labels == c].mean(axis=0) if np.any(train.labels == c)
                          else np.zeros(train.beats.shape[1], np.float32) for c in range(len(AAMI_CLASSES))])
    reference = float(np.mean(generator_membership_draws(lambda p, z, label, rr: templates[label].astype(np.float32),
                                                         1, 1, 2, train, held, seed, membership_draws)))
    rows: list[dict[str, Any]] = []
    fit = task.fit_function()
    t0 = time.monotonic()
    for n in sorted(steps):
        ema = fit(train, run, dataclasses.replace(base, steps=n))
        seconds = time.monotonic() - t0

        draws = generator_membership_draws(functools.partial(torch_generate, ema), ema.persona_dim, ema.beat_dim, 2,
                                           train, held, seed, membership_draws)
        auc = float(np.mean(draws))
        rng = np.random.default_rng(seed)
        fid = fidelity_report(held, train, {"gan": (surrogate_set(ema, held, rng), held.labels)}, seed=seed,
                              include_reference=False)["models"]["gan"]
        row = {"steps": n, "train_seconds": round(seconds, 1), "membership_auc": auc, "membership_draws": draws,
               "frechet": {c: fid["per_class"][c].get("frechet") for c in AAMI_CLASSES},
               "copy_rate": {c: fid["per_class"][c].get("copy_rate") for c in AAMI_CLASSES},
               "tstr_accuracy": fid["tstr"]["accuracy"], "tstr_macro_f1": fid["tstr"]["macro_f1"]}
        rows.append(row)
        log.info("steps %d: membership AUC %.3f, Frechet N %.2f", n, auc, row["frechet"]["N"] or float("nan"))
        report = {"hold_out": list(hold_out), "train_records": list(train_records), "run": str(run.dir),
                  "class_mean_reference_auc": reference, "rows": rows, "config": dataclasses.asdict(base)}
        _write(Path(output), report)  # after every row: a long sweep stopped early keeps what it measured
    return report


def _write(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "memorisation.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "memorisation.md").write_text(render(report))


def _changes(config: dict[str, Any]) -> str:
    from trainer.generator import GeneratorConfig

    default = dataclasses.asdict(GeneratorConfig())
    changed = [f"`{k}={v}`" for k, v in config.items()
               if k != "steps" and json.dumps(v, default=str) != json.dumps(default.get(k), default=str)]
    return ", ".join(changed) or "none"


def render(report: dict[str, Any]) -> str:
    """The Markdown table of membership and fidelity against steps."""
    def num(v: Any, fmt: str = ".2f") -> str:
        return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, fmt)

    lines = [
        "# Generator memorisation against training steps (DS1 subject hold-out)",
        "",
        (f"Trained on DS1 without {', '.join(report['hold_out'])}; members are beats of the "
        f"{len(report['train_records'])} training subjects, non-members beats of the held-out ones. "
        "Membership AUC: a beat scores higher the closer its nearest generated beat (target <= 0.55; "
        "mean over attack draws). "
        f"A class-mean 'generator' (nothing to memorise) scores {report['class_mean_reference_auc']:.3f} "
        "on the same split. Fréchet distances and TSTR are against the held-out subjects' real beats; "
         "copy rate: share of surrogates closer to a training beat than 95% of held-out beats are."),
        "",
        f"Generator settings that differ from `GeneratorConfig()`: {_changes(report['config'])}.",
        "",
        "| steps | training (cumulative) | membership AUC | Fréchet N | S | V | F | copy rate N | TSTR accuracy | TSTR macro F1 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        f = r["frechet"]
        lines.append(
            f"| {r['steps']} | {r['train_seconds'] / 60:.1f} min | {r['membership_auc']:.3f} | {num(f['N'])} | "
            f"{num(f['S'])} | {num(f['V'])} | {num(f['F'])} | {num(r['copy_rate']['N'], '.1%')} | "
            f"{r['tstr_accuracy']:.3f} | {r['tstr_macro_f1']:.3f} |")
    return "\n".join(lines) + "\n"
