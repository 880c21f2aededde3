"""`ditf eval hpatches`: homography estimation on HPatches with DIFT's protocol, over `ditf.eval.evaluate_hpatches`."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import warnings

from ditf.cli.common import HelpFormatter, add_model_args, add_settings_args, resolve_cli_settings
from ditf.cli.eval_sources import add_source_args, source_options
from ditf.cli.outputs import FIGURE_SUFFIXES, check_output_file
from ditf.eval.hpatches_keypoints import KEYPOINT_DETECTORS
from ditf.eval.hpatches_protocol import DEFAULT_THRESHOLDS, HOMOGRAPHY_MODES, REPROJECTION_THRESHOLD
from ditf.registry import TASK_DEFAULTS
from ditf.settings import FeatureSettings

DIFT_HPATCHES_BASELINE = {"dift": {"t": 0, "up_block": 2}}
"""DIFT's own HPatches settings for `--baseline dift` (its README: SD-2.1 at t=0, up_ft_index 2, 768x768)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `hpatches` to `ditf eval`."""
    parser = subparsers.add_parser(
        "hpatches", formatter_class=HelpFormatter,
        help="HPatches homography estimation (DIFT's protocol: mutual nearest neighbours, cv2.findHomography)",
        description=(
            "Homography accuracy on HPatches with DIFT's protocol (Tsingularity/dift eval_hpatches.py + "
            "eval_homography.py): image 1 of every sequence against images 2..6, descriptors sampled from each "
            "image's whole feature map at its keypoints, mutual nearest neighbours by cosine, cv2.findHomography, "
            "mean error of the four warped corners; percent of pairs within 1, 3, 5 px, over all, i_* and v_* "
            f"sequences. --model extracts every image at {TASK_DEFAULTS['hpatches'].settings['size'][0]}x"
            f"{TASK_DEFAULTS['hpatches'].settings['size'][1]} (DIFT's square resize) through the feature cache."
        ),
    )
    data = parser.add_argument_group("data and output")
    data.add_argument("--root", required=True, help="the hpatches-sequences-release folder (or its parent)")
    data.add_argument("--keypoints", required=True,
                      help=f"folder of <sequence>-<k>.kp files ('x y' rows; DIFT: SuperPoint, 1k per image), or a "
                           f"built-in detector: {', '.join(KEYPOINT_DETECTORS)} (not comparable to DIFT's numbers)")
    data.add_argument("-o", "--output", help="results JSON (overall, i, v, thresholds, per_pair, protocol card)")
    data.add_argument("--plot", help="also save accuracy against threshold here (.png, .pdf, ...)")
    data.add_argument("--sequences", nargs="+", help="only these sequences (scores then are not comparable)")
    data.add_argument("--require-all", action="store_true", help="insist on the 108 sequences of the standard protocol")
    data.add_argument("--quiet", action="store_true", help="no progress bars")
    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--mode", choices=HOMOGRAPHY_MODES, default="lmeds", help="cv2.findHomography method")
    protocol.add_argument("--thresholds", nargs="+", type=float, default=list(DEFAULT_THRESHOLDS),
                          help="corner-error thresholds in pixels")
    protocol.add_argument("--reprojection-threshold", type=float, default=REPROJECTION_THRESHOLD,
                          help="RANSAC reprojection threshold in pixels (LMEDS ignores it)")
    add_source_args(parser, "<sequence>/<k>.safetensors")
    add_model_args(parser, required=False)
    add_settings_args(parser)
    parser.set_defaults(func=run_hpatches)


def hpatches_settings(args: argparse.Namespace) -> FeatureSettings:
    """The --model settings: the model's HPatches task preset (DIFT's 768x768) changed by the flags; --resolution
    replaces the preset's square size."""
    settings = resolve_cli_settings(argparse.Namespace(**{**vars(args), "resolution": None}), task="hpatches")
    return settings.replace(resolution=args.resolution) if args.resolution is not None else settings


def run_hpatches(args: argparse.Namespace) -> int:
    """Score HPatches (or fill a shard of the cache), print the accuracies and the protocol card, write the files."""
    from ditf.eval.api_hpatches import evaluate_hpatches
    from ditf.io import write_json_atomic

    if args.output is not None:
        check_output_file(args.output, "--output", (".json",))
    if args.plot is not None:
        check_output_file(args.plot, "--plot", FIGURE_SUFFIXES)
    options = source_options(args, task="hpatches", baseline_overrides=DIFT_HPATCHES_BASELINE,
                             settings_for=hpatches_settings)
    warnings.showwarning = _warn_in_one_line  # the caller (`ditf.cli.main`) restores it
    results = evaluate_hpatches(args.root, keypoints=args.keypoints, mode=args.mode, thresholds=args.thresholds,
                                reprojection_threshold=args.reprojection_threshold, sequences=args.sequences,
                                require_all=args.require_all, progress=not args.quiet, **options)
    if args.shard is not None:
        print(json.dumps(results))
        return 0
    print(format_hpatches(results))
    if args.output is not None:
        print(f"wrote {write_json_atomic(args.output, results)}")
    if args.plot is not None:
        from ditf.eval.hpatches import plot_homography_accuracy

        print(f"wrote {plot_homography_accuracy(results, args.plot)}")
    return 0


def _warn_in_one_line(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    print(f"ditf: warning: {message}", file=sys.stderr)


def format_hpatches(results: dict) -> str:
    """The accuracies as a small table, then the protocol card, as plain text."""
    def cells(values: list[float] | None) -> str:
        return " ".join(f"{value:8.2f}" for value in values) if values is not None else "       -"

    header = " ".join(f"{f'<={threshold:g}px':>8}" for threshold in results["thresholds"])
    benchmark = results["benchmark"]
    lines = [f"HPatches homography accuracy (% of pairs), {benchmark['sequences']} sequences, {benchmark['pairs']} "
             "pairs" + ("" if benchmark["standard"] else " (not the standard 108 sequences)"),
             f"{'':<12} {header}"]
    for group, label in (("overall", "all"), ("i", "i_* (illum.)"), ("v", "v_* (view)")):
        lines.append(f"{label:<12} {cells(results[group])}")
    card = results["protocol"]
    lines.append(f"protocol card: {card['name']} ({card['reference']}), mode {card['mode']}")
    for key, value in card["description"].items():
        wrapped = textwrap.wrap(str(value), width=96) or [""]
        lines.append(f"  {key:<12} {wrapped[0]}")
        lines.extend(f"  {'':<12} {line}" for line in wrapped[1:])
    return "\n".join(lines)
