"""`ditf smoke-model`: build the random-weight FLUX-architecture smoke model used by the demo."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `smoke-model`."""
    from ditf.cli.common import HelpFormatter

    parser = subparsers.add_parser(
        "smoke-model", formatter_class=HelpFormatter,
        help="save a tiny RANDOM-WEIGHT FLUX-architecture pipeline (features are meaningless; for smoke tests)"
    )
    parser.add_argument("-o", "--output", required=True, help="folder to write the diffusers pipeline to")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the smoke pipeline folder (skipped when it already exists)."""
    from pathlib import Path

    from ditf.errors import InvalidArgumentError
    from ditf.smoke import build_flux_smoke_pipeline

    folder = Path(args.output)
    if (folder / "model_index.json").is_file():
        print(f"smoke model already at {folder}")
        return 0
    if folder.exists():
        raise InvalidArgumentError(f"{str(folder)!r} exists but holds no smoke model (no model_index.json); delete it "
                                   "or pass another folder.")
    build_flux_smoke_pipeline(folder)
    print(f"wrote a random-weight FLUX-architecture smoke model to {folder} (its features are meaningless)")
    return 0
