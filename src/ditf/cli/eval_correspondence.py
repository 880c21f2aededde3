"""`ditf eval spair | pfpascal | ap10k`: keypoint-correspondence benchmarks (PCK), over `ditf.eval.evaluate_*`.

Features come from exactly one of `--features DIR` (precomputed `DIR/<category>/<stem>.safetensors`),
`--model` (a `DiTFExtractor`) or `--baseline NAME` (`ditf.baselines`), the last two through the
content-addressed cache. With `--shard i/n` a process only fills the cache for its share of the images; a
final run with `--cache-only` (or without --shard) scores. `--fuse dinov2-b14` fuses every pair with DINOv2
features (`ditf.features.fusion`, the paper's † rows), extracted through the same cache.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ditf.cli.common import (
    HelpFormatter,
    add_model_args,
    add_scoring_args,
    add_settings_args,
    check_scoring_processes,
    device_of,
)
from ditf.cli.eval_sources import add_source_args, source_options
from ditf.cli.outputs import check_output_file
from ditf.errors import InvalidArgumentError
from ditf.eval.ap10k import AP10K_SPLITS, AP10K_SUBSETS
from ditf.eval.pfpascal import PF_PASCAL_SPLITS
from ditf.eval.prompts import PROMPT_MODES
from ditf.eval.protocol import GEOAWARE_PAD_SIZE, MATCHERS, PROTOCOL_NAMES, THRESHOLDS
from ditf.eval.spair import SPAIR_LAYOUTS, SPAIR_SPLITS, VARIATION_FLAGS
from ditf.features.fusion_settings import FUSABLE_BASELINES, GRIDS, NORMALIZE_MODES, PCA_METHODS, FusionSettings

FUSION_DEFAULTS = FusionSettings()

BENCHMARKS = {
    "spair": ("SPair-71k PCK", SPAIR_SPLITS),
    "pfpascal": ("PF-Pascal PCK", PF_PASCAL_SPLITS),
    "ap10k": ("AP-10K PCK (GeoAware-SC pairs)", AP10K_SPLITS),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `spair`, `pfpascal` and `ap10k` to `ditf eval`."""
    common = _common_options()
    for name, (title, splits) in BENCHMARKS.items():
        parser = subparsers.add_parser(name, parents=[common], help=title, formatter_class=HelpFormatter,
                                       description=f"Score features on {title}.")
        parser.add_argument("--split", choices=splits, default="test", help="dataset split")
        if name == "spair":
            parser.add_argument("--filter", action="append", default=[], metavar="FLAG=V[,V]",
                                help=f"keep pairs whose variation flag takes one of the values; flags: "
                                     f"{', '.join(VARIATION_FLAGS)} (repeatable)")
            parser.add_argument("--layout", choices=SPAIR_LAYOUTS, help="only the pairs listed in Layout/<layout>/<split>.txt")
        if name == "ap10k":
            parser.add_argument("--subset", choices=list(AP10K_SUBSETS), default="intra-species",
                                help="GeoAware-SC's pair subset")
        parser.set_defaults(func=run_benchmark, benchmark=name)


def _common_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    data = parser.add_argument_group("data and output")
    data.add_argument("--root", required=True, help="dataset folder")
    data.add_argument("-o", "--output", help="results JSON; a Markdown table is written next to it")
    data.add_argument("--categories", nargs="+", help="only these categories")
    data.add_argument("--plot", action="store_true", help="also write a per-category bar chart and a pairs figure")
    data.add_argument("--plot-pairs", type=int, default=6, help="pairs in the pairs figure")
    data.add_argument("--quiet", action="store_true", help="no progress bars")

    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--protocol", choices=PROTOCOL_NAMES, default="ditf",
                          help="ditf: original size, exact upsampled argmax, <=; geoaware: square pad, patch argmax, <")
    protocol.add_argument("--threshold", choices=THRESHOLDS, help="PCK length: target bbox or image (dataset default)")
    protocol.add_argument("--matcher", choices=MATCHERS, help="override the protocol's matcher")
    protocol.add_argument("--pad-size", type=int, help=f"square side of --protocol geoaware (default: {GEOAWARE_PAD_SIZE})")
    add_scoring_args(protocol)
    protocol.add_argument("--allow", default="", metavar="CHECKS",
                          help="feature-map checks to switch off, comma-separated: constant, aspect")

    add_source_args(parser, "<category>/<image stem>.safetensors")
    source = parser.add_argument_group("prompts")
    source.add_argument("--prompt-mode", choices=PROMPT_MODES,
                        help="empty, class ('a photo of a {category}', the default for --model) or caption "
                             "(per-image captions from --captions)")
    source.add_argument("--captions", help="JSON {category + image file name: caption} (DiTF authors' format)")
    add_model_args(parser, required=False)
    add_settings_args(parser)
    add_fusion_args(parser)
    return parser


def add_fusion_args(parser: argparse.ArgumentParser) -> None:
    """Add --fuse and the fusion parameters (defaults: SD-DINO's recipe, DiTF reduced to 512 by PCA)."""
    group = parser.add_argument_group("fusion with DINOv2 (the paper's † rows; see ditf.features.fusion)")
    group.add_argument("--fuse", choices=FUSABLE_BASELINES,
                       help="fuse each pair's features with this DINOv2 baseline's, extracted through the cache")
    group.add_argument("--fuse-features", metavar="DIR",
                       help="fuse with precomputed DINOv2 maps DIR/<category>/<image stem>.safetensors instead")
    group.add_argument("--fuse-weights", nargs=2, type=float, metavar=("DITF", "DINO"),
                       help=f"weight of each L2-normalised part (default: {' '.join(f'{w:g}' for w in FUSION_DEFAULTS.weights)}, "
                            "SD-DINO's)")
    group.add_argument("--fuse-dims", nargs=2, type=parse_fusion_dims, metavar=("DITF", "DINO"),
                       help="principal components kept per part, or 'none' to keep it whole (default: "
                            f"{' '.join(str(d).lower() for d in FUSION_DEFAULTS.dims)}: 512 + 768 = the paper's 1280 "
                            "with dinov2-b14)")
    group.add_argument("--fuse-normalize", choices=NORMALIZE_MODES,
                       help=f"when each part is L2-normalised per location (default: {FUSION_DEFAULTS.normalize}, "
                            "SD-DINO's: after PCA)")
    group.add_argument("--fuse-grid", choices=GRIDS,
                       help=f"the common grid of an image's two maps (default: {FUSION_DEFAULTS.grid})")
    group.add_argument("--fuse-pca", choices=PCA_METHODS,
                       help=f"exact (float64 eigendecomposition) or lowrank (SD-DINO's seeded torch.pca_lowrank) "
                            f"(default: {FUSION_DEFAULTS.pca})")


def parse_fusion_dims(text: str) -> int | None:
    """'512' -> 512, 'none' -> None (keep the part whole)."""
    if text.strip().lower() == "none":
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of dimensions >= 1 or 'none'")
    return int(text)


FUSION_FLAGS = {"fuse_weights": ("--fuse-weights", "weights"), "fuse_dims": ("--fuse-dims", "dims"),
                "fuse_normalize": ("--fuse-normalize", "normalize"), "fuse_grid": ("--fuse-grid", "grid"),
                "fuse_pca": ("--fuse-pca", "pca")}


def fusion_options(args: argparse.Namespace) -> dict[str, Any]:
    """The fusion keywords of `ditf.eval.evaluate_*` from --fuse, --fuse-features and the --fuse-* parameters."""
    given = {field: tuple(value) if isinstance(value, list) else value
             for name, (_, field) in FUSION_FLAGS.items() if (value := getattr(args, name, None)) is not None}
    if args.fuse is None and args.fuse_features is None:
        if given:
            flags = [FUSION_FLAGS[name][0] for name in FUSION_FLAGS if getattr(args, name, None) is not None]
            raise InvalidArgumentError(f"{', '.join(flags)} only apply together with --fuse (or --fuse-features); "
                                       "add --fuse dinov2-b14 or drop them.")
        return {}
    if args.fuse is not None and args.fuse_features is not None:
        raise InvalidArgumentError("pass one of --fuse NAME (extract DINOv2 features) and --fuse-features DIR "
                                   "(precomputed DINOv2 maps), not both.")
    options: dict[str, Any] = {"fusion": FusionSettings(**given)}
    if args.fuse_features is not None:
        return {**options, "fuse_features": args.fuse_features}
    from ditf.baselines import BaselineExtractor

    return {**options, "fuse": BaselineExtractor(args.fuse, device=device_of(args))}


def run_benchmark(args: argparse.Namespace) -> int:
    """Extract (a shard of) features or score the benchmark, print the protocol card and the table, and write
    the results files."""
    from ditf.eval import api
    from ditf.eval.report import format_protocol_card, markdown_table, write_results

    if args.output is not None:
        check_output_file(args.output, "--output", (".json",))
    elif args.plot:
        raise InvalidArgumentError("--plot writes figures next to the results file: add --output results.json.")
    check_scoring_processes(args)
    allow = [check.strip() for check in args.allow.split(",") if check.strip()]
    options = dict(source_options(args, task=args.benchmark), **fusion_options(args), protocol=args.protocol,
                   threshold=args.threshold, matcher=args.matcher, pad_size=args.pad_size, categories=args.categories,
                   split=args.split, workers=args.workers, threads=args.threads, allow=allow, progress=not args.quiet)
    if args.benchmark == "spair":
        from ditf.eval.spair import parse_filters

        results = api.evaluate_spair(args.root, filters=parse_filters(args.filter), layout=args.layout, **options)
    elif args.benchmark == "pfpascal":
        results = api.evaluate_pfpascal(args.root, **options)
    else:
        results = api.evaluate_ap10k(args.root, subset=args.subset, **options)
    if args.shard is not None:
        print(json.dumps(results))
        if results["missing_in_dataset"]:
            print(f"{results['missing_in_dataset']} images still lack features; score with --cache-only once "
                  "every shard has finished")
        return 0
    print(markdown_table(results))
    if args.output:
        dataset = results_dataset(args) if args.plot else None
        for path in write_results(results, args.output, dataset, plot=args.plot, num_plot_pairs=args.plot_pairs):
            print(f"wrote {path}")
    else:
        print(format_protocol_card(results["protocol"]))
    return 0


def results_dataset(args: argparse.Namespace) -> Any:
    """The dataset scored (loaded again: the results hold predictions, not annotations), for the pairs figure."""
    if args.benchmark == "spair":
        from ditf.eval.spair import load_spair, parse_filters

        return load_spair(args.root, args.split, args.categories, parse_filters(args.filter), args.layout)
    if args.benchmark == "pfpascal":
        from ditf.eval.pfpascal import load_pfpascal

        return load_pfpascal(args.root, args.split, args.categories, with_boxes=args.threshold == "bbox")
    from ditf.eval.ap10k import load_ap10k

    return load_ap10k(args.root, args.subset, args.split, args.categories)
