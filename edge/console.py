"""What every command line of the product does the same way: logging, help, clean errors."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Mapping

#: Errors a user can fix (bad path, bad value, missing extra): one line on stderr, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ImportError, ValueError)


def run_command(
    parser: argparse.ArgumentParser,
    handlers: Mapping[str, Callable[[argparse.Namespace], int]],
    argv: list[str] | None = None,
) -> int:
    """Parse, set up logging, dispatch on ``args.command``; help when no command is given."""
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="text (default) or json: one JSON object per line, for log collectors")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if args.log_format == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO), handlers=[handler])
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return handlers[args.command](args)
    except USER_ERRORS as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)
