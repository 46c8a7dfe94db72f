"""``python -m fusionlm.evaluate.lmms ARGS``: lmms-eval's command line with ``--model fusionlm`` known."""

from __future__ import annotations

import sys

from . import register


def main(argv: list[str] | None = None) -> None:
    """``python -m fusionlm.evaluate.lmms ARGS``: lmms-eval's CLI, with ``--model fusionlm`` known."""
    register()
    from lmms_eval.cli.dispatch import main as lmms_main

    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    lmms_main()


if __name__ == "__main__":
    main()
