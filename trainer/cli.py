"""`ecg-trainer`: prepares PhysioNet ECG for training the beat generator and classifier."""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter

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

log = logging.getLogger("trainer")

DESCRIPTION = """\
Train the models the edge runs: a class-conditional beat generator (the surrogates) and an AAMI
beat classifier, from the MIT-BIH Arrhythmia Database, and export them as ONNX.

Commands available now:
  data download DIR   download the MIT-BIH Arrhythmia Database from PhysioNet into DIR
  data summary        check the data directory and count beats per AAMI class in DS1 and DS2
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
    return parser


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


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), {"data": cmd_data}, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
