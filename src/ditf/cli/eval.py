"""`ditf eval ...`: benchmark evaluation commands (correspondence, video propagation, homography, segmentation)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `ditf eval <benchmark>` sub-commands."""
    from ditf.cli import eval_correspondence, eval_davis, eval_hpatches, eval_segmentation

    parser = subparsers.add_parser("eval", help="evaluate features on a benchmark",
                                   description="Evaluate features on a benchmark with its published protocol.")
    benchmarks = parser.add_subparsers(dest="benchmark", required=True)
    eval_correspondence.register(benchmarks)
    eval_davis.register(benchmarks)
    eval_hpatches.register(benchmarks)
    eval_segmentation.register(benchmarks)
