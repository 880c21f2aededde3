"""The `ditf` command: a thin layer over the public functions.

Each command family lives in its own module with a `register(subparsers)` function that adds its
sub-commands and binds each to a `run(args) -> int` through `set_defaults(func=...)`.
"""

from __future__ import annotations

import argparse
import sys

from ditf.errors import DitfError


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the `ditf` command with every sub-command registered."""
    from ditf.cli import eval as eval_cli
    from ditf.cli import features as features_cli
    from ditf.cli import app as app_cli
    from ditf.cli import massive as massive_cli
    from ditf.cli import pca as pca_cli
    from ditf.cli import smoke as smoke_cli

    from ditf import __version__

    parser = argparse.ArgumentParser(
        prog="ditf", description="Dense features from Diffusion Transformers (DiTF) and massive-activation tools."
    )
    parser.add_argument("--version", action="version", version=f"ditf {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    features_cli.register(subparsers)
    eval_cli.register(subparsers)
    massive_cli.register(subparsers)
    smoke_cli.register(subparsers)
    pca_cli.register(subparsers)
    app_cli.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ditf` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DitfError as err:
        print(f"ditf: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
