"""`ditf eval spair | pfpascal | ap10k`: keypoint-correspondence benchmarks (PCK), over `ditf.eval.evaluate_*`.

Features come from exactly one of `--features DIR` (precomputed `DIR/<category>/<stem>.safetensors`),
`--model` (a `DiTFExtractor`) or `--baseline NAME` (`ditf.baselines`), the last two through the
content-addressed cache. With `--shard i/n` a process only fills the cache for its share of the images; a
final run with `--cache-only` (or without --shard) scores.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ditf.cli.common import (
    HelpFormatter,
    add_model_args,
    add_settings_args,
    device_of,
    quiet_loading,
    resolve_cli_settings,
)
from ditf.cli.outputs import check_output_file
from ditf.errors import InvalidArgumentError
from ditf.eval.ap10k import AP10K_SPLITS, AP10K_SUBSETS
from ditf.eval.pfpascal import PF_PASCAL_SPLITS
from ditf.eval.prompts import PROMPT_MODES
from ditf.eval.protocol import GEOAWARE_PAD_SIZE, MATCHERS, PROTOCOL_NAMES, THRESHOLDS
from ditf.eval.spair import SPAIR_LAYOUTS, SPAIR_SPLITS, VARIATION_FLAGS
from ditf.settings import DTYPES

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
    protocol.add_argument("--workers", type=int, default=1, help="CPU processes scoring pairs in parallel")
    protocol.add_argument("--allow", default="", metavar="CHECKS",
                          help="feature-map checks to switch off, comma-separated: constant, aspect")

    source = parser.add_argument_group("features (exactly one of --features / --model / --baseline)")
    source.add_argument("--features", help="folder of <category>/<image stem>.safetensors (tensor 'features', (C, h, w))")
    source.add_argument("--baseline", help="baseline extractor from ditf.baselines: dift, dinov2-b14, dinov2-l14")
    source.add_argument("--prompt-mode", choices=PROMPT_MODES,
                        help="empty, class ('a photo of a {category}', the default for --model) or caption "
                             "(per-image captions from --captions)")
    source.add_argument("--captions", help="JSON {category + image file name: caption} (DiTF authors' format)")
    source.add_argument("--cache", help="feature cache folder (default $DITF_CACHE_DIR/features or ~/.cache/ditf/features)")
    source.add_argument("--cache-dtype", choices=list(DTYPES), help="store cached maps in this dtype")
    source.add_argument("--shard", help="i/n (0 <= i < n) or 'auto' (RANK/WORLD_SIZE): only fill the cache for this share")
    source.add_argument("--cache-only", action="store_true", help="score from the cache; never run the model")
    add_model_args(parser, required=False)
    add_settings_args(parser)
    return parser


def run_benchmark(args: argparse.Namespace) -> int:
    """Extract (a shard of) features or score the benchmark, print the protocol card and the table, and write
    the results files."""
    from ditf.eval import api
    from ditf.eval.report import format_protocol_card, markdown_table, write_results

    if args.output is not None:
        check_output_file(args.output, "--output", (".json",))
    elif args.plot:
        raise InvalidArgumentError("--plot writes figures next to the results file: add --output results.json.")
    if args.workers < 1:
        raise InvalidArgumentError(f"--workers {args.workers}: give at least 1 (processes scoring pairs).")
    allow = [check.strip() for check in args.allow.split(",") if check.strip()]
    options = dict(source_options(args), protocol=args.protocol, threshold=args.threshold, matcher=args.matcher,
                   pad_size=args.pad_size, categories=args.categories, split=args.split, workers=args.workers,
                   allow=allow, progress=not args.quiet)
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


def source_options(args: argparse.Namespace) -> dict[str, Any]:
    """The feature-source keywords of `ditf.eval.evaluate_*` from --features / --model / --baseline."""
    chosen = [flag for flag, value in (("--features", args.features), ("--model", args.model),
                                       ("--baseline", args.baseline)) if value is not None]
    if len(chosen) != 1:
        raise InvalidArgumentError(
            "pass exactly one of --features DIR (precomputed maps), --model ALIAS (extract with DiTFeaturizer) or "
            f"--baseline NAME (dift, dinov2-b14, dinov2-l14); got {', '.join(chosen) or 'none'}"
        )
    cache = dict(cache_dir=args.cache, cache_only=args.cache_only, shard=args.shard,
                 cache_dtype={"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(args.cache_dtype),
                 prompt_mode=args.prompt_mode, captions=args.captions)
    if args.features is not None:
        from ditf.cli.common import settings_overrides

        given = [flag for flag, value in (("--shard", args.shard), ("--cache-only", args.cache_only),
                                          ("--cache", args.cache), ("--cache-dtype", args.cache_dtype),
                                          ("--prompt-mode", args.prompt_mode), ("--variant", args.variant))
                 if value] + [f"--{name.replace('_', '-')}" for name in settings_overrides(args)]
        if given:
            raise InvalidArgumentError(
                f"{', '.join(sorted(set(given)))} describe how features are extracted, but --features reads "
                "precomputed maps; drop them, or extract with --model instead of --features."
            )
        return {"features": args.features}
    quiet_loading()
    if args.baseline is not None:
        from ditf.baselines import BaselineExtractor
        from ditf.settings import torch_dtype

        device = device_of(args)
        return {"extractor": BaselineExtractor(args.baseline, torch_dtype(args.dtype, device), device), **cache}
    from ditf.eval.extractors import DiTFExtractor

    settings = resolve_cli_settings(args, task=args.benchmark)
    extractor = DiTFExtractor(args.model, settings, task=args.benchmark, device=device_of(args), offload=args.offload,
                              config=args.config, variant_files=args.weights_variant)
    return {"extractor": extractor, **cache}


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
