"""`ecg-trainer`: prepares PhysioNet ECG for training the beat generator and classifier."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections import Counter
from pathlib import Path

from edge.console import run_command
from edge.records import (
    AAMI_CLASSES,
    DATA_DIR_ENV,
    DS1,
    DS2,
    PACED,
    download,
    read_record,
    resolve_data_dir,
)
from trainer import __version__
from trainer.tasks import IMAGE_BASELINE_WEIGHTS, TASKS

log = logging.getLogger("trainer")

DESCRIPTION = """\
Train the models the edge runs: a class-conditional beat generator (the surrogates) and an AAMI
beat classifier, from the MIT-BIH Arrhythmia Database, and export them as ONNX.

Commands:
  data download DIR   download the MIT-BIH Arrhythmia Database from PhysioNet into DIR
  data summary        check the data directory and count beats per AAMI class in DS1 and DS2
  fit TASK            train the classifier, the generator or the image baseline on DS1
  export RUN_DIR      write a trained run as ONNX with its contract, and its model card
  defaults            train and export the models that ship inside the edge package
  evaluate            re-identification, linkability, membership, timing and class figures on DS2
  keygen OUT          make the Ed25519 key pair that signs models (OUT.key, OUT.pub)
  publish MODEL       sign a model and announce it to running edges over MQTT (retained)
"""

EPILOG = f"""\
The data directory comes from --data-dir, else ${DATA_DIR_ENV}, else ./data/mitdb.
Train and tune on DS1 only; DS2 is for measurement (de Chazal et al. 2004).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecg-trainer", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    data = sub.add_parser("data", help="get and check the MIT-BIH Arrhythmia Database")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    dl = data_sub.add_parser("download", help="download mitdb from PhysioNet (about 100 MB)")
    dl.add_argument("dir", help="directory to download into")
    sm = data_sub.add_parser("summary", help="count beats per AAMI class in DS1 and DS2")
    sm.add_argument("--data-dir", help=f"MIT-BIH directory (default ${DATA_DIR_ENV} or ./data/mitdb)")

    fit = sub.add_parser(
        "fit", help="train a model on DS1 in a new run directory",
        description="Train on the DS1 records in runs/<task>/NNN/ (options.json, metrics.jsonl, "
        "checkpoint.pt, model.pt). The classifier is then scored on DS2 (evaluation.json). "
        "Several GPUs: torchrun --nproc-per-node N -m trainer.cli fit ...",
    )
    fit.add_argument("task", choices=sorted(TASKS), help="what to train")
    fit.add_argument("--data-dir", help=f"MIT-BIH directory (default ${DATA_DIR_ENV} or ./data/mitdb)")
    fit.add_argument("--runs-dir", default="runs", help="where run directories go (default ./runs)")
    fit.add_argument("--cache-dir", default=".cache/beats", help="encoded beat sets are cached here")
    fit.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="auto takes CUDA when there is one (mixed precision on CUDA)")
    fit.add_argument("--seed", type=int, help="random seed (default: the config's)")
    fit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set epochs=3 (repeatable)")
    fit.add_argument("--train-records", nargs="+", metavar="REC", help="train on these records instead of DS1")
    fit.add_argument("--eval-records", nargs="+", metavar="REC", help="measure on these records instead of DS2")
    fit.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    fit.add_argument("--dry-run", action="store_true", help="print the resolved options and stop")
    fit.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    fit.add_argument("--threads", type=int, help="torch CPU threads (default: the task's, 1 for the classifier, else torch's "
                     "choice; recorded, since CPU results repeat bit for bit only at the same count)")

    ex = sub.add_parser(
        "export", help="write a trained run as an ONNX model for the edge",
        description="Export the run's model with a dynamic batch axis and its contract (codec spec, "
        "classes, latent sizes, RR inputs, training-data hash, version, headline metrics) in the "
        "ONNX metadata; check parity against torch on random inputs and print the max abs error.",
    )
    ex.add_argument("run_dir", help="a finished run directory (runs/<task>/NNN)")
    ex.add_argument("--output", required=True, help="ONNX file to write (for an image-baseline run: its weights file)")
    ex.add_argument("--version", help="model version (default: UTC timestamp YYYY.MM.DD.HHMMSS)")
    ex.add_argument("--baseline", metavar="RUN_DIR", help="image-baseline run to measure beside a generator")
    ex.add_argument("--data-dir", help="MIT-BIH directory (a generator's card measures fidelity on DS2)")
    ex.add_argument("--cache-dir", default=".cache/beats")

    df = sub.add_parser(
        "defaults", help="train and export the models that ship with the edge (CPU, about 30 min)",
        description="Fit the classifier, the generator and the image baseline with their default "
        "configs, export classifier.onnx and generator.onnx with their model cards into OUTPUT.",
    )
    df.add_argument("--data-dir", help=f"MIT-BIH directory (default ${DATA_DIR_ENV} or ./data/mitdb)")
    df.add_argument("--output", default="edge/assets/models", help="where the models go (default edge/assets/models)")
    df.add_argument("--baseline-output", default=str(IMAGE_BASELINE_WEIGHTS),
                    help="where the image baseline's weights go, for `ecg-trainer evaluate` (default "
                    "trainer/assets/image-baseline.pt)")
    df.add_argument("--runs-dir", default="runs")
    df.add_argument("--cache-dir", default=".cache/beats")
    df.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    df.add_argument("--version", help="model version (default: UTC timestamp)")
    df.add_argument("--no-progress", action="store_true")
    df.add_argument("--threads", type=int, help="torch CPU threads for every fit (default: each task's, as for fit)")

    ev = sub.add_parser(
        "evaluate", help="privacy and utility of the edge's output on DS2 (report.md, report.json)",
        description="Run the edge pipeline (file mode) over DS2 records and measure re-identification, "
        "linkability and membership inference against the raw stream and the rhythm twin, and timing, HRV "
        "and class F1 against the reference annotations.",
    )
    ev.add_argument("--data-dir", help=f"MIT-BIH directory (default ${DATA_DIR_ENV} or ./data/mitdb)")
    ev.add_argument("--output", default="docs/evaluation", help="report directory (default docs/evaluation)")
    ev.add_argument("--records", nargs="+", help="records (default: DS2)")
    ev.add_argument("--minutes", type=float, default=10.0, help="minutes of each record (default 10)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--cache-dir", default=".cache/beats")
    ev.add_argument("--baseline", default=str(IMAGE_BASELINE_WEIGHTS),
                    help="the seed paper's image baseline for its rows: a run directory (runs/image-baseline/NNN) or "
                    "a weights file from `ecg-trainer export` of one (default: trainer/assets/image-baseline.pt)")
    ev.add_argument("--no-baseline", action="store_true", help="leave the image baseline's rows out")
    ev.add_argument("--no-xqrs", action="store_true", help="skip wfdb's xqrs on the output (the slowest part)")
    ev.add_argument("--redraw", type=int, default=0,
                    help="the product stream's classifier-guided redraw tries (pipeline.redraw; default 0: off)")
    ev.add_argument("--judge", choices=("recipe", "features", "both"), default="recipe",
                    help="independent reader(s) of the emitted beats: a classifier of the shipped recipe trained "
                    "with other seeds, a feature-based classifier, or both (default recipe)")
    ev.add_argument("--no-curve", action="store_true", help="skip the privacy-utility curve")

    mm = sub.add_parser(
        "memorisation", help="membership inference and fidelity against generator steps, on a DS1 subject hold-out",
        description="Train a generator on DS1 without the hold-out subjects and measure, after each of --steps, "
        "the membership-inference AUC (training subjects against held-out ones) and fidelity against the "
        "held-out beats: how the generator's training length is chosen without looking at DS2.",
    )
    mm.add_argument("--data-dir", help=f"MIT-BIH directory (default ${DATA_DIR_ENV} or ./data/mitdb)")
    mm.add_argument("--output", default="docs/evaluation", help="report directory (default docs/evaluation)")
    mm.add_argument("--hold-out", nargs="+", metavar="REC", help="DS1 records left out of training")
    mm.add_argument("--train-records", nargs="+", metavar="REC", help="train on these (default: DS1 minus the hold-out)")
    mm.add_argument("--steps", nargs="+", type=int, help="generator steps to measure at")
    mm.add_argument("--runs-dir", default="runs")
    mm.add_argument("--cache-dir", default=".cache/beats")
    mm.add_argument("--seed", type=int, default=0)
    mm.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="generator config override (repeatable)")

    kg = sub.add_parser(
        "keygen", help="make an Ed25519 key pair for signing models",
        description="Write OUT.key (private key, PEM, mode 0600: keep it with whoever releases models) and "
        "OUT.pub (public key, PEM: give it to gateway operators for refresh.public_keys).",
    )
    kg.add_argument("out", metavar="OUT", help="path and name of the pair, without suffix")
    kg.add_argument("--force", action="store_true", help="replace an existing pair")

    pb = sub.add_parser(
        "publish", help="sign a model and announce it to running edges (retained MQTT message)",
        description="Load the model as an edge would, sign it and its header (version, kind, SHA-256, size) "
        "with the private key, and publish the announcement retained at QoS 1 on <topic-prefix>/<kind>. "
        "Edges that trust the public key verify it, check it against what they run and swap it in "
        "between two batches (docs/model-refresh.md).",
    )
    pb.add_argument("model", metavar="MODEL", help="ONNX model from ecg-trainer export")
    pb.add_argument("--key", required=True, help="private key from ecg-trainer keygen (OUT.key)")
    pb.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT", help="default 127.0.0.1:1883")
    pb.add_argument("--tls", action="store_true", help="connect with TLS")
    pb.add_argument("--ca-file", help="CA that signed the broker's certificate (default: the system's)")
    pb.add_argument("--username", help="MQTT user name")
    pb.add_argument("--password-file", help="file whose first line is the MQTT password")
    pb.add_argument("--topic-prefix", default="ecg/models", help="default ecg/models (the edge's refresh.topic_prefix)")
    pb.add_argument("--max-bytes", type=int, default=16 * 1024 * 1024,
                    help="largest model to announce (default 16 MiB; edges refuse above their refresh.max_model_bytes)")
    pb.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the broker (default 30)")
    return parser


def cmd_fit(args: argparse.Namespace) -> int:
    from trainer import pipeline

    result = pipeline.fit(
        args.task, args.overrides, data_dir=args.data_dir, runs_dir=args.runs_dir,
        cache_dir=args.cache_dir, device=args.device, seed=args.seed, resume=args.resume,
        dry_run=args.dry_run, progress_bar=not args.no_progress,
        train_records=args.train_records, eval_records=args.eval_records, threads=args.threads,
    )
    if args.dry_run:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    else:
        print(f"trained {args.task}: {result}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from trainer import pipeline

    command = "ecg-trainer " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = pipeline.export(args.run_dir, args.output, args.version, baseline_run=args.baseline,
                             data_dir=args.data_dir, cache_dir=args.cache_dir, command=command)
    if isinstance(result, Path):
        print(f"exported the image baseline's weights to {result}")
        return 0
    print(f"exported {result.contract.kind} v{result.contract.version} to {result.path} "
          f"(max abs error vs torch {result.max_abs_error:.2e})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from edge.records import DS2
    from trainer.evaluate import CURVE, evaluate, render

    report = evaluate(args.data_dir, args.output, tuple(args.records or DS2), args.minutes, args.seed, args.cache_dir,
                      baseline_run=None if args.no_baseline else args.baseline, detect_with_xqrs=not args.no_xqrs,
                      curve=() if args.no_curve else CURVE,
                      product_settings={"redraw": args.redraw} if args.redraw else None,
                      recipe_judge=args.judge in ("recipe", "both"), feature_judge=args.judge in ("features", "both"))
    print(render(report))
    print(f"wrote {args.output}/report.md and report.json")
    return 0


def cmd_memorisation(args: argparse.Namespace) -> int:
    from trainer.memorisation import HOLD_OUT, STEPS, render, sweep

    report = sweep(args.data_dir, args.output, tuple(args.hold_out or HOLD_OUT), tuple(args.steps or STEPS),
                   runs_dir=args.runs_dir, cache_dir=args.cache_dir, seed=args.seed, overrides=args.overrides,
                   train_records=args.train_records)
    print(render(report))
    print(f"wrote {args.output}/memorisation.md and memorisation.json")
    return 0


def cmd_defaults(args: argparse.Namespace) -> int:
    from trainer import pipeline

    done = pipeline.build_defaults(args.data_dir, args.output, runs_dir=args.runs_dir, cache_dir=args.cache_dir,
                                   device=args.device, version=args.version, progress_bar=not args.no_progress,
                                   threads=args.threads, baseline_output=args.baseline_output)
    for kind, result in done["exports"].items():
        print(f"{kind}: {result.path} v{result.contract.version} (max abs error vs torch {result.max_abs_error:.2e})")
    if done["baseline"]:
        print(f"image baseline (the evaluation's comparison): {done['baseline']}")
    print(f"built in {done['seconds'] / 60:.1f} min; runs: {', '.join(str(p) for p in done['runs'].values())}")
    return 0


def summarize(data_dir: str | None) -> dict[str, Counter[str]]:
    """Beats per AAMI class in each split (paced records counted apart)."""
    counts: dict[str, Counter[str]] = {"DS1": Counter(), "DS2": Counter(), "paced": Counter()}
    for split, names in (("DS1", DS1), ("DS2", DS2), ("paced", PACED)):
        for name in names:
            rec = read_record(name, data_dir, annotator="atr")
            counts[split].update(c for c in rec.aami_classes if c)
    return counts


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "download":
        path = download(args.dir)
        print(f"downloaded mitdb into {path}; use --data-dir {path} or export {DATA_DIR_ENV}={path}")
        return 0
    data_dir = resolve_data_dir(args.data_dir)
    counts = summarize(str(data_dir))
    print(f"MIT-BIH Arrhythmia Database at {data_dir}")
    print("split  records  " + "  ".join(f"{c:>6}" for c in AAMI_CLASSES) + "   total")
    for split, names in (("DS1", DS1), ("DS2", DS2), ("paced", PACED)):
        c = counts[split]
        print(f"{split:<6} {len(names):>7}  " + "  ".join(f"{c[k]:>6}" for k in AAMI_CLASSES) + f"  {sum(c.values()):>6}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from edge.announce import key_id, load_public_key
    from trainer.publish import keygen

    private, public = keygen(args.out, force=args.force)
    print(f"wrote {private} (private, mode 0600) and {public} (public, key id {key_id(load_public_key(public))})")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from edge.mqtt import BrokerConfig
    from trainer.publish import parse_broker, publish

    host, port = parse_broker(args.broker)
    if args.password_file and not args.username:
        raise ValueError("--password-file needs --username")
    password = (Path(args.password_file).read_text().splitlines() or [""])[0].strip() if args.password_file else None
    broker = BrokerConfig(host=host, port=port, tls=args.tls, ca_file=args.ca_file, username=args.username,
                          password=password)
    done = asyncio.run(publish(args.model, args.key, broker, topic_prefix=args.topic_prefix,
                               max_model_bytes=args.max_bytes, timeout_s=args.timeout))
    print(f"published {done.kind} v{done.version} (sha256 {done.sha256[:16]}…, {done.model_bytes:,} bytes; "
          f"announcement {done.payload_bytes:,} bytes, key {done.key_id}) retained on {done.topic} at {broker}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), {"data": cmd_data, "fit": cmd_fit, "export": cmd_export, "defaults": cmd_defaults,
                                   "evaluate": cmd_evaluate, "memorisation": cmd_memorisation,
                                   "keygen": cmd_keygen, "publish": cmd_publish}, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
