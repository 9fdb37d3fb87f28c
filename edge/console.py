"""What every command line of the product does the same way: logging, help, clean errors."""

from __future__ import annotations

import argparse
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
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return handlers[args.command](args)
    except USER_ERRORS as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
