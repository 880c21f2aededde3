"""`ditf eval davis` (propagate + score) and `ditf eval davis-score` (score any results folder)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ditf.cli.common import add_model_args, feature_settings, featurizer_from_args
from ditf.errors import InvalidArgumentError
from ditf.io import write_json_atomic
from ditf.eval.davis import (
    DITF_DAVIS_SHORT_SIDE,
    DITF_DAVIS_SIZE_MULTIPLE,
    ExtractFn,
    plot_davis_scores,
    run_davis,
    score_davis,
)
from ditf.matching.propagation import DITF_DAVIS_PROPAGATION, PropagationSettings

# DiTF's DAVIS feature settings (ganchaofan0000/DiTF `eval_davis.sh`/README): FLUX block k=24, t=90,
# one noise draw, the fixed prompt "a photo of a image" (sic), massive channels discarded.
DITF_DAVIS_BLOCK = 24
DITF_DAVIS_T = 90
DITF_DAVIS_ENSEMBLE = 1
DITF_DAVIS_PROMPT = "a photo of a image"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `davis-score` and `davis` to `ditf eval`."""
    score = subparsers.add_parser(
        "davis-score",
        help="J&F of a DAVIS-2017 results folder (official semi-supervised protocol; no model needed)",
    )
    _add_dataset_arguments(score)
    score.add_argument("--results", type=Path, required=True, help="folder with <seq>/<frame>.png indexed PNGs")
    score.add_argument("--output", type=Path, help="write the scores JSON here (atomically)")
    score.add_argument("--plot", type=Path, help="also save a per-object J/F bar chart here (.png, .pdf, ...)")
    score.set_defaults(func=run_score)

    davis = subparsers.add_parser(
        "davis",
        help="propagate DAVIS-2017 first-frame masks with DiT features, then score J&F",
        description=(
            "DiTF's DAVIS protocol by default: block 24, t 90, ensemble 1, prompt 'a photo of a image', "
            "frames with short side 960 (long side floored to a multiple of 32), the first frame plus 7 "
            "previous frames, window radius 12 cells, top-5, temperature 0.1."
        ),
    )
    _add_dataset_arguments(davis)
    davis.add_argument("--output", type=Path, required=True, help="results folder to fill with <seq>/<frame>.png")
    davis.add_argument("--scores", type=Path, help="scores JSON path (default: <output>/jf.json)")
    davis.add_argument("--plot", type=Path, help="also save a per-object J/F bar chart here")
    add_model_args(davis, block=DITF_DAVIS_BLOCK, t=DITF_DAVIS_T)
    davis.set_defaults(ensemble=DITF_DAVIS_ENSEMBLE, prompt=DITF_DAVIS_PROMPT)
    frames = davis.add_argument_group("frames and propagation (default: DiTF's DAVIS settings)")
    frames.add_argument("--short-side", type=int, default=DITF_DAVIS_SHORT_SIDE, help="frame short side in px")
    frames.add_argument(
        "--size-multiple", type=int, default=DITF_DAVIS_SIZE_MULTIPLE, help="long side floored to this multiple"
    )
    frames.add_argument("--n-last-frames", type=int, default=DITF_DAVIS_PROPAGATION.n_last_frames)
    frames.add_argument(
        "--radius", type=int, default=DITF_DAVIS_PROPAGATION.neighborhood_radius, help="window radius in cells"
    )
    frames.add_argument("--topk", type=int, default=DITF_DAVIS_PROPAGATION.topk)
    frames.add_argument("--temperature", type=float, default=DITF_DAVIS_PROPAGATION.temperature)
    davis.set_defaults(func=run_propagate_and_score)


def _add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, required=True, help="DAVIS folder (JPEGImages/, Annotations/, ImageSets/)")
    parser.add_argument("--split", default="val", help="ImageSets/2017/<split>.txt (default: val)")
    parser.add_argument("--sequences", nargs="+", help="only these sequences (default: the whole split)")
    parser.add_argument("--quiet", action="store_true", help="hide progress bars")


def run_score(args: argparse.Namespace) -> int:
    """Score `--results` and print the global J&F numbers (and write `--output`, `--plot`)."""
    scores = score_davis(
        args.root, args.results, args.split, sequences=args.sequences, output=args.output, progress=not args.quiet
    )
    _report(scores, args.output, args.plot)
    return 0


def run_propagate_and_score(args: argparse.Namespace) -> int:
    """Propagate with the DiT features of `--model`, write the results folder, then score it."""
    settings = PropagationSettings(args.n_last_frames, args.radius, args.topk, args.temperature)
    extract_fn, feature_record = build_extract_fn(args)
    run_davis(
        args.root,
        extract_fn,
        args.output,
        split=args.split,
        sequences=args.sequences,
        short_side=args.short_side,
        size_multiple=args.size_multiple,
        settings=settings,
        feature_record={"model": args.model, **feature_record},
        progress=not args.quiet,
    )
    scores = score_davis(args.root, args.output, args.split, sequences=args.sequences, progress=not args.quiet)
    scores["settings"] = {
        "model": args.model, **feature_record, "short_side": args.short_side, "size_multiple": args.size_multiple,
        "n_last_frames": settings.n_last_frames, "neighborhood_radius": settings.neighborhood_radius,
        "topk": settings.topk, "temperature": settings.temperature,
    }  # fmt: skip
    scores_path = args.scores or args.output / "jf.json"
    write_json_atomic(scores_path, scores)
    _report(scores, scores_path, args.plot)
    return 0


def build_extract_fn(args: argparse.Namespace) -> tuple[ExtractFn, dict]:
    """A DiTFeaturizer-backed `extract_fn(image_path, (H, W)) -> (C, h, w)` and its feature settings.

    The frame size comes from `run_davis` (short side rule) and replaces the featurizer's resolution.
    """
    if args.resolution is not None:
        raise InvalidArgumentError(
            f"--resolution {args.resolution} does not apply to DAVIS: frames are resized by the short-side rule; "
            "use --short-side (and --size-multiple) instead."
        )
    featurizer = featurizer_from_args(args)
    settings = feature_settings(args, featurizer, resolution=False)

    def extract(image_path: Path, size: tuple[int, int]) -> torch.Tensor:
        return featurizer([image_path], size=size, progress=False, **settings)[0]

    return extract, {key: value for key, value in settings.items() if key != "max_batch"}


def _report(scores: dict, output: Path | None, plot: Path | None) -> None:
    print(json.dumps(scores["global"], indent=1))
    if output is not None:
        print(f"scores written to {output}")
    if plot is not None:
        print(f"plot written to {plot_davis_scores(scores, plot)}")
