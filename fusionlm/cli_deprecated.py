"""The command line's older spellings, still accepted: each is read as its new form and prints one
deprecation line to stderr (positional checkpoints and outputs, `fusionlm data --out`, `eval --tasks FILE.yaml`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def deprecated(command: str, old: str, new: str) -> None:
    print(f"fusionlm {command}: {old} is deprecated; use {new}", file=sys.stderr)


def add_moved(p: argparse.ArgumentParser, flag: str, metavar: str, help: str) -> None:
    """`flag METAVAR`, and the positional METAVAR it replaces, deprecated (see resolve_moved)."""
    dest = flag.lstrip("-").replace("-", "_")
    p.add_argument(flag, metavar=metavar, help=help)
    p.add_argument(f"old_{dest}", nargs="?", metavar=metavar, help=f"deprecated: use {flag} {metavar}")
    p.set_defaults(moved=[*(p.get_default("moved") or []), (dest, flag, metavar)])


def resolve_moved(args) -> None:
    """Each deprecated positional onto its flag, with one line; both spellings, or neither: exit 2."""
    old = []
    for dest, flag, metavar in getattr(args, "moved", []):
        new, positional = getattr(args, dest), getattr(args, f"old_{dest}")
        if (new is None) == (positional is None):
            args.parser.error(f"argument {flag}: not allowed with the positional {metavar}; give one" if new
                              else f"the following arguments are required: {flag}")
        if positional is not None:
            setattr(args, dest, positional)
            old.append((flag, metavar))
    if old:
        deprecated(args.command, "the positional " + " ".join(m for _, m in old),
                    " ".join(f"{f} {m}" for f, m in old))


def old_data_form(argv: list[str]) -> list[str]:
    """`fusionlm data --out …` (before `data synth`) read as `fusionlm data synth --out …`, with one line."""
    if argv[:1] == ["data"] and len(argv) > 1 and argv[1].startswith("-") and argv[1] not in ("-h", "--help"):
        deprecated("data", "`fusionlm data --out …` without a subcommand", "`fusionlm data synth --out …`")
        return ["data", "synth", *argv[1:]]
    return argv


def old_task_file(args) -> None:
    """eval --tasks FILE.yaml, the spelling before --tasks-file, read as --tasks-file FILE.yaml."""
    if not args.tasks_file and args.tasks and len(args.tasks) == 1 and Path(args.tasks[0]).suffix in (".yaml", ".yml"):
        deprecated("eval", "--tasks FILE.yaml", "--tasks-file FILE.yaml (--tasks names tasks)")
        args.tasks_file, args.tasks = args.tasks[0], None
