"""``moe-atlas``: one entry point, one subcommand per module.

Each subcommand is a module ``moe_atlas.cmd_<name>`` with ``HELP`` (one
line), ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status);
adding one is a module and a line in :data:`COMMANDS`. Errors are one line on
stderr, ``moe-atlas <command>: error: <what, naming the file/key/region>``,
with exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

# subcommand -> module; the modules are imported only when their command runs (or for --help)
COMMANDS = {
    "run": "moe_atlas.cmd_run",
    "new": "moe_atlas.cmd_new",
    "check": "moe_atlas.cmd_check",
    "analyses": "moe_atlas.cmd_analyses",
    "import": "moe_atlas.cmd_import",
    "verify": "moe_atlas.cmd_verify",
    "serve": "moe_atlas.cmd_serve",
}

EXIT_ERROR = 2


class CliError(Exception):
    """An error to report as one line (bad input, a refused action); the message names what is wrong."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-atlas",
        description="Capture, import and analyse Mixture-of-Experts routing (see README.md).",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        print(f"moe-atlas {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure is one line unless --debug
        if getattr(args, "debug", False):
            traceback.print_exc()
        else:
            msg = " ".join(str(exc).split()) or type(exc).__name__
            print(f"moe-atlas {args.command}: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
