"""`vlmkit` command line: one sub-command per module, each defined next to the code it runs.

Every sub-command module exposes `register(subparsers)`, which adds its parser and sets
`func=callable(args) -> int | None` as the handler. Add a module to `_COMMAND_MODULES` to enroll it.
Registering imports no torch or transformers (handlers import what they run), so `vlmkit --help`
and `vlmkit methods` start at once. A command that takes `--threads` gets it applied before its
handler runs (`vlmkit.commands.threads`).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from vlmkit.errors import VlmkitError

_COMMAND_MODULES = (
    "vlmkit.commands.methods",
    "vlmkit.commands.demo",
    "vlmkit.commands.calibrate",
    "vlmkit.data.cli",
    "vlmkit.eval.cli",
    "vlmkit.train.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmkit", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:  # a real missing dependency inside the module
                raise
            continue  # sub-command not built yet
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command.

    vlmkit's own errors, and the operating system's (a read-only folder, a full disk), print as one
    ``vlmkit <command>: error: ...`` line naming what failed, with status 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if "threads" in vars(args):
            from vlmkit.commands import threads

            args.threads = threads.apply(args.threads)
        return int(args.func(args) or 0)
    except VlmkitError as error:
        print(f"vlmkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"vlmkit {args.command}: error: {_os_error(error)}", file=sys.stderr)
        return 2


def _os_error(error: OSError) -> str:
    """One line for an operating-system error: what failed, on which path, and what to do."""
    where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    reason = error.strerror or str(error)
    return (
        f"{reason}: {where or 'no path given'}. Fix the folder's permissions or free space, then rerun the same "
        "command (a rerun of `vlmkit eval` keeps every finished sample)."
    )


if __name__ == "__main__":
    sys.exit(main())
