"""`ditf eval davis` (propagate + score) and `ditf eval davis-score` (score any results folder)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ditf.eval.davis import (
    DITF_DAVIS_SHORT_SIDE,
    DITF_DAVIS_SIZE_MULTIPLE,
    ExtractFn,
    plot_davis_scores,
    run_davis,
    score_davis,
    write_json_atomic,
)
from ditf.matching.propagation import DITF_DAVIS_PROPAGATION, PropagationSettings

DITF_DAVIS_PROMPT = "a photo of a image"
"""DiTF's fixed DAVIS prompt (sic), from its `eval_davis.py`."""


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
        "davis", help="propagate DAVIS-2017 first-frame masks with DiT features, then score J&F"
    )
    _add_dataset_arguments(davis)
    davis.add_argument("--model", required=True, help="model alias, hub id or local folder (e.g. flux-dev)")
    davis.add_argument("--block", type=int, default=24, help="global block index k (DiTF DAVIS: 24)")
    davis.add_argument("--t", type=int, default=90, help="timestep out of 1000 (DiTF DAVIS: 90)")
    davis.add_argument("--ensemble", type=int, default=1, help="noised copies averaged (DiTF DAVIS: 1)")
    davis.add_argument("--prompt", default=DITF_DAVIS_PROMPT, help="text prompt (DiTF: %(default)r)")
    davis.add_argument("--seed", type=int, default=0, help="noise seed")
    davis.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    davis.add_argument("--output", type=Path, required=True, help="results folder to fill with <seq>/<frame>.png")
    davis.add_argument("--scores", type=Path, help="scores JSON path (default: <output>/jf.json)")
    davis.add_argument("--plot", type=Path, help="also save a per-object J/F bar chart here")
    davis.add_argument("--short-side", type=int, default=DITF_DAVIS_SHORT_SIDE, help="frame short side in px")
    davis.add_argument(
        "--size-multiple", type=int, default=DITF_DAVIS_SIZE_MULTIPLE, help="long side floored to this multiple"
    )
    davis.add_argument("--n-last-frames", type=int, default=DITF_DAVIS_PROPAGATION.n_last_frames)
    davis.add_argument(
        "--radius", type=int, default=DITF_DAVIS_PROPAGATION.neighborhood_radius, help="window radius in cells"
    )
    davis.add_argument("--topk", type=int, default=DITF_DAVIS_PROPAGATION.topk)
    davis.add_argument("--temperature", type=float, default=DITF_DAVIS_PROPAGATION.temperature)
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
    run_davis(
        args.root,
        build_extract_fn(args),
        args.output,
        split=args.split,
        sequences=args.sequences,
        short_side=args.short_side,
        size_multiple=args.size_multiple,
        settings=settings,
        progress=not args.quiet,
    )
    scores = score_davis(args.root, args.output, args.split, sequences=args.sequences, progress=not args.quiet)
    scores["settings"] = {
        "model": args.model, "block": args.block, "t": args.t, "ensemble": args.ensemble,
        "prompt": args.prompt, "seed": args.seed, "short_side": args.short_side,
        "size_multiple": args.size_multiple, "n_last_frames": settings.n_last_frames,
        "neighborhood_radius": settings.neighborhood_radius, "topk": settings.topk,
        "temperature": settings.temperature,
    }  # fmt: skip
    scores_path = args.scores or args.output / "jf.json"
    write_json_atomic(scores_path, scores)
    _report(scores, scores_path, args.plot)
    return 0


def build_extract_fn(args: argparse.Namespace) -> ExtractFn:
    """A DiTFeaturizer-backed `extract_fn(image_path, (H, W)) -> (C, h, w)` for `run_davis`."""
    from ditf import DiTFeaturizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    featurizer = DiTFeaturizer.from_pretrained(args.model, torch_dtype=dtype, device=device)

    def extract(image_path: Path, size: tuple[int, int]) -> torch.Tensor:
        features = featurizer(
            [image_path], prompt=args.prompt, t=args.t, block=args.block, ensemble=args.ensemble,
            discard="auto", seed=args.seed, size=size,
        )  # fmt: skip
        return features[0]

    return extract


def _report(scores: dict, output: Path | None, plot: Path | None) -> None:
    print(json.dumps(scores["global"], indent=1))
    if output is not None:
        print(f"scores written to {output}")
    if plot is not None:
        print(f"plot written to {plot_davis_scores(scores, plot)}")
