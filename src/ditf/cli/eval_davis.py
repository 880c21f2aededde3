"""`ditf eval davis` (propagate + score) and `ditf eval davis-score` (score any results folder)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ditf.cli.common import (
    HelpFormatter,
    add_model_args,
    add_settings_args,
    device_of,
    quiet_loading,
    resolve_cli_settings,
)
from ditf.cli.outputs import FIGURE_SUFFIXES, check_output_file, check_output_folder
from ditf.registry import TASK_DEFAULTS

DAVIS_PROTOCOL = TASK_DEFAULTS["davis"].protocol


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `davis-score` and `davis` to `ditf eval`."""
    score = subparsers.add_parser(
        "davis-score", formatter_class=HelpFormatter,
        help="J&F of a DAVIS-2017 results folder (official semi-supervised protocol; no model needed)",
    )
    _add_dataset_arguments(score)
    score.add_argument("--results", type=Path, required=True, help="folder with <seq>/<frame>.png indexed PNGs")
    score.add_argument("-o", "--output", type=Path, help="write the scores JSON here (atomically)")
    score.add_argument("--plot", type=Path, help="also save a per-object J/F bar chart here (.png, .pdf, ...)")
    score.set_defaults(func=run_score)

    davis = subparsers.add_parser(
        "davis", formatter_class=HelpFormatter,
        help="propagate DAVIS-2017 first-frame masks with DiT features, then score J&F",
        description=(
            "DiTF's DAVIS protocol by default (the model's DAVIS preset; FLUX.1-dev: block 24, t 90): ensemble 1, "
            "prompt 'a photo of a image', frames with short side 960 (long side floored to a multiple of 32), "
            "the first frame plus 7 previous frames, window radius 12 cells, top-5, temperature 0.1. A model without "
            "a published DAVIS setting keeps its own block and timestep; the scores say so."
        ),
    )
    _add_dataset_arguments(davis)
    davis.add_argument("-o", "--output", type=Path, required=True, help="results folder to fill with <seq>/<frame>.png")
    davis.add_argument("--scores", type=Path, help="scores JSON path (default: <output>/jf.json)")
    davis.add_argument("--plot", type=Path, help="also save a per-object J/F bar chart here")
    add_model_args(davis)
    add_settings_args(davis, image_size=False)
    frames = davis.add_argument_group("frames and propagation (default: DiTF's DAVIS settings)")
    frames.add_argument("--short-side", type=int, help=f"frame short side in px (default: {DAVIS_PROTOCOL['short_side']})")
    frames.add_argument("--size-multiple", type=int,
                        help=f"long side floored to this multiple (default: {DAVIS_PROTOCOL['size_multiple']})")
    frames.add_argument("--n-last-frames", type=int,
                        help=f"previous frames used (default: {DAVIS_PROTOCOL['n_last_frames']})")
    frames.add_argument("--neighborhood-radius", type=int,
                        help=f"window radius in cells (default: {DAVIS_PROTOCOL['neighborhood_radius']})")
    frames.add_argument("--topk", type=int, help=f"neighbours kept per cell (default: {DAVIS_PROTOCOL['topk']})")
    frames.add_argument("--temperature", type=float,
                        help=f"softmax temperature (default: {DAVIS_PROTOCOL['temperature']})")
    davis.set_defaults(func=run_propagate_and_score)


def _add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, required=True, help="DAVIS folder (JPEGImages/, Annotations/, ImageSets/)")
    parser.add_argument("--split", default="val", help="ImageSets/2017/<split>.txt")
    parser.add_argument("--sequences", nargs="+", help="only these sequences (default: the whole split)")
    parser.add_argument("--quiet", action="store_true", help="hide progress bars")


def run_score(args: argparse.Namespace) -> int:
    """Score `--results` and print the global J&F numbers (and write `--output`, `--plot`)."""
    from ditf.eval.davis import score_davis

    _check_outputs(args.output, args.plot, "--output")
    scores = score_davis(args.root, args.results, args.split, sequences=args.sequences, output=args.output,
                         progress=not args.quiet)
    _report(scores, args.output, args.plot)
    return 0


def run_propagate_and_score(args: argparse.Namespace) -> int:
    """Propagate with the DiT features of `--model`, write the results folder, then score it."""
    from ditf.eval.api import evaluate_davis
    from ditf.eval.extractors import DiTFExtractor

    check_output_folder(args.output, "--output")
    _check_outputs(args.scores, args.plot, "--scores")
    settings = resolve_cli_settings(args, task="davis")
    quiet_loading()
    extractor = DiTFExtractor(args.model, settings, task="davis", device=device_of(args), offload=args.offload,
                              config=args.config, variant_files=args.weights_variant)
    scores_path = args.scores or args.output / "jf.json"
    scores = evaluate_davis(args.root, args.output, extractor=extractor, split=args.split, sequences=args.sequences,
                            short_side=args.short_side, size_multiple=args.size_multiple, n_last_frames=args.n_last_frames,
                            neighborhood_radius=args.neighborhood_radius, topk=args.topk, temperature=args.temperature,
                            scores=scores_path, progress=not args.quiet)
    _report(scores, scores_path, args.plot)
    return 0


def _check_outputs(scores: Path | None, plot: Path | None, scores_flag: str) -> None:
    if scores is not None:
        check_output_file(scores, scores_flag, (".json",))
    if plot is not None:
        check_output_file(plot, "--plot", FIGURE_SUFFIXES)


def _report(scores: dict, output: Path | None, plot: Path | None) -> None:
    print(json.dumps(scores["global"], indent=1))
    if output is not None:
        print(f"scores written to {output}")
    if plot is not None:
        from ditf.eval.davis import plot_davis_scores

        print(f"plot written to {plot_davis_scores(scores, plot)}")
