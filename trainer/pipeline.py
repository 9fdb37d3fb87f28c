"""The trainer's jobs behind the command line: fit a task in a run directory, export a run to ONNX.

A run directory holds ``options.json`` (resolved options), ``metrics.jsonl`` (training log),
``checkpoint.pt`` (resumable state), ``model.pt`` (the trained torch module) and, for the
classifier, ``evaluation.json`` (DS2 scores). ``export`` turns a run into an ONNX file whose
metadata carries the contract the edge checks, plus a model card beside it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from edge.codec import DEFAULT_SPEC
from edge.models import GENERATOR, ModelContract
from edge.records import AAMI_CLASSES
from trainer import __version__
from trainer.tasks import TASKS, Task, resolve_config

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
EVALUATION_FILE = "evaluation.json"


def fit_options(task: Task, cfg: Any, args: dict[str, Any]) -> dict[str, Any]:
    """Everything that determines a run, as JSON-ready values (printed by --dry-run)."""
    return {
        "task": task.name,
        "config": dataclasses.asdict(cfg),
        "codec": DEFAULT_SPEC.to_metadata(),
        **args,
        "trainer": __version__,
    }


def fit(
    task_name: str,
    overrides: list[str],
    *,
    data_dir: str | None,
    runs_dir: str,
    cache_dir: str | None,
    device: str = "auto",
    seed: int | None = None,
    resume: str | None = None,
    dry_run: bool = False,
    progress_bar: bool = True,
    train_records: tuple[str, ...] | None = None,
    eval_records: tuple[str, ...] | None = None,
    threads: int | None = None,
) -> Path | dict[str, Any]:
    """Train ``task_name`` on DS1 in a new (or resumed) run directory; returns the directory.

    ``train_records``/``eval_records`` replace DS1/DS2 (small runs on a few records, tests).

    ``threads`` sets torch's intra-op threads (default: the task's, else torch's choice). On the CPU
    the result is the same bit for bit for the same options and thread count, so the count is recorded.

    With ``dry_run`` nothing is read or written: the resolved options come back instead.
    """
    import torch

    from edge.records import DS1, DS2
    from trainer.dataset import load_records
    from trainer.runs import Run, seed_everything, unwrap

    task = TASKS[task_name]
    if resume is not None:
        saved = json.loads((Path(resume) / "options.json").read_text())
        if saved.get("task") != task_name:
            raise ValueError(f"{resume} is a {saved.get('task')!r} run, not {task_name!r}")
        overrides = [f"{k}={json.dumps(v) if isinstance(v, (list, tuple)) else v}" for k, v in saved["config"].items()]
        seed = saved.get("seed", seed)
        threads = saved.get("threads", threads)
        train_records, eval_records = tuple(saved["train_records"]), tuple(saved["eval_records"])
    train_records = tuple(train_records or DS1)
    eval_records = tuple(eval_records or DS2)
    cfg = resolve_config(task, overrides, seed)
    seed = getattr(cfg, "seed", seed if seed is not None else 0)
    threads = threads if threads is not None else task.threads
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        options = fit_options(task, cfg, {"data_dir": data_dir, "device": device, "seed": seed,
                                          "threads": torch.get_num_threads(),
                                          "train_records": list(train_records), "eval_records": list(eval_records)})
        if dry_run:
            return options
        run = Run.start(runs_dir, task_name, options, device=device, resume=resume, progress_bar=progress_bar)
        seed_everything(seed + run.rank)
        train = load_records(train_records, data_dir, cache_dir)
        log.info("training set: %d beats %s", len(train), train.class_counts())
        t0 = time.monotonic()
        model = task.fit_function()(train, run, cfg)
        seconds = time.monotonic() - t0
        if run.is_main:
            module = unwrap(model) if isinstance(model, torch.nn.Module) else model
            if isinstance(module, torch.nn.Module):
                module = module.cpu().eval()
            torch.save({"task": task_name, "module": module, "config": dataclasses.asdict(cfg),
                        "data_hash": train.data_hash, "records": list(train.records), "fit_seconds": seconds,
                        "eval_records": list(eval_records), "data_dir": data_dir},
                       run.dir / MODEL_FILE)
            if task_name == "classifier":
                evaluate_classifier_run(run.dir, data_dir, cache_dir)
        run.barrier()
        run.close()
    finally:
        torch.set_num_threads(before)  # the next fit in this process (defaults) starts from the same state
    log.info("%s trained in %.0f s: %s", task_name, seconds, run.dir)
    return run.dir


def load_run(run_dir: str | Path) -> dict[str, Any]:
    import torch

    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {MODEL_FILE}: the run has not finished")
    return torch.load(path, map_location="cpu", weights_only=False)


def evaluate_classifier_run(run_dir: Path, data_dir: str | None, cache_dir: str | None) -> dict[str, Any]:
    """Score a trained classifier inter-patient on DS2 and keep the result in the run."""
    from trainer.classifier import evaluate_classifier
    from trainer.dataset import load_records

    saved = load_run(run_dir)
    test = load_records(saved["eval_records"], data_dir, cache_dir)
    metrics = evaluate_classifier(saved["module"], test)
    metrics["records"] = list(saved["eval_records"])
    (Path(run_dir) / EVALUATION_FILE).write_text(json.dumps(metrics, indent=2, default=_jsonable))
    return metrics


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def contract_for(run_dir: str | Path, version: str | None = None) -> tuple[ModelContract, Any]:
    """The contract a run's model will carry, and the torch module."""
    saved = load_run(run_dir)
    task = TASKS[saved["task"]]
    if task.kind is None:
        raise ValueError(f"{saved['task']} models are not exported to the edge (they are a baseline)")
    cfg = saved["config"]
    extra = {
        "producer": f"ecg-trainer {__version__}",
        "training.records": ",".join(saved["records"]),
        "training.fit_seconds": f"{saved.get('fit_seconds', 0):.0f}",
    }
    evaluation = Path(run_dir) / EVALUATION_FILE
    if evaluation.is_file():
        metrics = json.loads(evaluation.read_text())
        extra["metrics.ds2"] = json.dumps(headline_metrics(metrics), sort_keys=True)
    dims = {}
    if task.kind == GENERATOR:
        dims = {"persona_dim": int(cfg["persona_dim"]), "beat_dim": int(cfg["beat_dim"])}
    contract = ModelContract(
        kind=task.kind,
        version=version or time.strftime("%Y.%m.%d.%H%M%S", time.gmtime()),
        codec=DEFAULT_SPEC,
        classes=AAMI_CLASSES,
        rr_features=task.rr_features,
        data_hash=saved["data_hash"],
        extra=extra,
        **dims,
    )
    return contract, saved["module"]


def headline_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The few figures worth carrying inside the model file: per-class F1 and macro F1."""
    out: dict[str, float] = {}
    for cls, row in metrics.get("per_class", {}).items():
        if isinstance(row, dict) and row.get("f1") is not None:
            out[f"f1_{cls}"] = round(float(row["f1"]), 4)
    if metrics.get("macro_f1") is not None:
        out["macro_f1"] = round(float(metrics["macro_f1"]), 4)
    return out


def export(
    run_dir: str | Path,
    output: str | Path,
    version: str | None = None,
    *,
    baseline_run: str | Path | None = None,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    command: str = "",
) -> Any:
    """Write the run's model as ONNX with its contract, and its model card (``<output>.md``); an
    image-baseline run is written as weights (``ImageBaseline.save``) and its path returned.

    A generator's card measures fidelity on DS2, so it needs the data directory; the image
    baseline run, when given, is measured beside it. The model is checked and measured before
    anything is written, so an export that fails leaves no model at ``output``.
    """
    from trainer import card
    from trainer.export import build_model, save_model
    from trainer.image_baseline import ImageBaseline

    trained = load_run(run_dir)["module"]
    if isinstance(trained, ImageBaseline):  # not an edge model: weights for the evaluation's comparison row
        return trained.save(output)
    contract, module = contract_for(run_dir, version)
    output = Path(output)
    data, error = build_model(module, contract)
    report = None
    if contract.kind == GENERATOR:
        baseline = load_run(baseline_run)["module"] if baseline_run else None
        saved = load_run(run_dir)
        body, report = card.generator_section(
            module, baseline, saved["records"], saved["eval_records"], data_dir or saved.get("data_dir"),
            cache_dir, output.with_suffix(".png"))
        title = "beat generator"
    else:
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        body = card.classifier_section(json.loads((Path(run_dir) / EVALUATION_FILE).read_text()),
                                       [r for r in rows if r.get("phase") in ("restart", "out-of-fold")])
        title = "beat classifier"
    result = save_model(data, error, contract, output)
    if report is not None:
        output.with_suffix(".fidelity.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    card.write_card(output.with_suffix(".md"), title, contract, output, error, body,
                    command or f"ecg-trainer export {run_dir} --output {output}")
    return result


def build_defaults(
    data_dir: str | None,
    output_dir: str | Path,
    *,
    runs_dir: str = "runs",
    cache_dir: str | None = ".cache/beats",
    device: str = "auto",
    version: str | None = None,
    progress_bar: bool = True,
    threads: int | None = None,
    baseline_output: str | Path | None = None,
) -> dict[str, Any]:
    """Train the classifier, the generator and the image baseline, export the two shipped models
    (and the image baseline's weights to ``baseline_output``, when given)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = {"data_dir": data_dir, "runs_dir": runs_dir, "cache_dir": cache_dir, "device": device,
              "progress_bar": progress_bar, "threads": threads}
    t0 = time.monotonic()
    runs = {name: fit(name, [], **common) for name in ("classifier", "generator", "image-baseline")}
    command = f"ecg-trainer defaults --data-dir {data_dir or '<MIT-BIH directory>'} --output {output_dir}"
    results = {
        "classifier": export(runs["classifier"], out / "classifier.onnx", version, data_dir=data_dir,
                             cache_dir=cache_dir, command=command),
        "generator": export(runs["generator"], out / "generator.onnx", version, baseline_run=runs["image-baseline"],
                            data_dir=data_dir, cache_dir=cache_dir, command=command),
    }
    log.info("default models built in %.0f s", time.monotonic() - t0)
    baseline = export(runs["image-baseline"], baseline_output) if baseline_output else None
    return {"runs": runs, "exports": results, "baseline": baseline, "seconds": time.monotonic() - t0}
