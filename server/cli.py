"""The ``phenolens`` command.

Each area contributes its subcommands from one module in ``server/commands``
(``register(subparsers)`` adds parsers whose ``func(args) -> int`` runs them),
so this file only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = (
    "server.commands.faces",  # compare, encode
    "server.commands.gallery",  # gallery ..., match
    "server.commands.explain",  # explain
    "server.commands.service",  # serve, info
    "server.commands.evaluate",  # evaluate
    "server.commands.syndrome",  # composite, syndrome-map, fill-in
    "server.commands.synth",  # synth, train
    "server.commands.report",  # report
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phenolens",
        description="Explainable GestaltMatcher-style face matching.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that area has no commands yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a person reads this: say what failed, not a traceback
        from server.errors import describe_error

        message, code = describe_error(exc)
        if args.verbose:
            raise
        print(f"phenolens: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
