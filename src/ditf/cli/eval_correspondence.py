"""`ditf eval spair | pfpascal | ap10k`: keypoint-correspondence benchmarks (PCK).

Features come from exactly one of `--features DIR` (precomputed `DIR/<category>/<stem>.safetensors`),
`--model ALIAS` (DiTFeaturizer, through `ditf.eval.harness.extractor_from_args`) or `--baseline NAME`
(`ditf.baselines`), the last two extracted into a content-addressed cache. With
`--shard i/n` a process only fills the cache for its share of the images; a final run with
`--cache-only` (or without --shard) scores.
"""

from __future__ import annotations

import argparse
import json

from ditf.errors import InvalidArgumentError
from ditf.eval.ap10k import AP10K_SPLITS, AP10K_SUBSETS, load_ap10k
from ditf.eval.harness import (
    DTYPES,
    GEOAWARE_PAD_SIZE,
    MATCHERS,
    PROTOCOL_NAMES,
    THRESHOLDS,
    VARIANTS,
    baseline_extractor_from_args,
    evaluate,
    extract_shard,
    extractor_from_args,
    parse_shard,
    protocol_for,
)
from ditf.eval.keypoints import CorrespondenceDataset
from ditf.eval.pfpascal import PF_PASCAL_SPLITS, load_pfpascal
from ditf.eval.report import format_protocol_card, markdown_table, write_results
from ditf.eval.sources import PROMPT_MODES, FeatureFolder
from ditf.eval.spair import SPAIR_LAYOUTS, SPAIR_SPLITS, VARIATION_FLAGS, load_spair, parse_filters


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `spair`, `pfpascal` and `ap10k` to `ditf eval`."""
    common = _common_options()
    spair = subparsers.add_parser("spair", parents=[common], help="SPair-71k PCK",
                                  description="Score features on SPair-71k keypoint pairs (PCK).")
    spair.add_argument("--split", choices=SPAIR_SPLITS, default="test")
    spair.add_argument("--filter", action="append", default=[], metavar="FLAG=V[,V]",
                       help=f"keep pairs whose flag takes one of the values; flags: {', '.join(VARIATION_FLAGS)}")
    spair.add_argument("--layout", choices=SPAIR_LAYOUTS, help="only the pairs listed in Layout/<layout>/<split>.txt")
    spair.set_defaults(func=run_spair)

    pfpascal = subparsers.add_parser("pfpascal", parents=[common], help="PF-Pascal PCK",
                                     description="Score features on PF-Pascal keypoint pairs (PCK).")
    pfpascal.add_argument("--split", choices=PF_PASCAL_SPLITS, default="test")
    pfpascal.set_defaults(func=run_pfpascal)

    ap10k = subparsers.add_parser("ap10k", parents=[common], help="AP-10K PCK (GeoAware-SC pairs)",
                                  description="Score features on AP-10K keypoint pairs (GeoAware-SC benchmark).")
    ap10k.add_argument("--split", choices=AP10K_SPLITS, default="test")
    ap10k.add_argument("--subset", choices=list(AP10K_SUBSETS), default="intra-species")
    ap10k.set_defaults(func=run_ap10k)


def _common_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    data = parser.add_argument_group("data and output")
    data.add_argument("--root", required=True, help="dataset folder")
    data.add_argument("--output", help="results JSON; a Markdown table is written next to it")
    data.add_argument("--categories", nargs="+", help="only these categories")
    data.add_argument("--plot", action="store_true", help="also write a per-category bar chart and a pairs figure")
    data.add_argument("--plot-pairs", type=int, default=6, help="pairs in the pairs figure (default 6)")
    data.add_argument("--quiet", action="store_true", help="no progress bars")

    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--protocol", choices=PROTOCOL_NAMES, default="ditf",
                          help="ditf: original size, exact upsampled argmax, <=; geoaware: square pad, patch argmax, <")
    protocol.add_argument("--threshold", choices=THRESHOLDS, help="PCK length: target bbox or image (dataset default)")
    protocol.add_argument("--matcher", choices=MATCHERS, help="override the protocol's matcher")
    protocol.add_argument("--pad-size", type=int, default=GEOAWARE_PAD_SIZE, help="square side of --protocol geoaware")

    source = parser.add_argument_group("features (exactly one of --features / --model / --baseline)")
    source.add_argument("--features", help="folder of <category>/<image stem>.safetensors (tensor 'features', (C, h, w))")
    source.add_argument("--model", help="model alias, hub id or local path for DiTFeaturizer")
    source.add_argument("--baseline", help="baseline extractor from ditf.baselines: dift, dinov2-b14, dinov2-l14")
    source.add_argument("--variant", choices=sorted(VARIANTS), default="ditf",
                        help="raw, ln (LayerNorm), adaln (+modulation), ditf (+massive-channel discard)")
    source.add_argument("--block", type=int, help="global block index k (preset default)")
    source.add_argument("--t", type=float, help="timestep in 0..1000 (preset default)")
    source.add_argument("--ensemble", type=int, help="noisy copies averaged (preset default)")
    source.add_argument("--resolution", type=int, help="long side in pixels (preset default)")
    source.add_argument("--seed", type=int, default=0, help="noise seed")
    source.add_argument("--prompt-mode", choices=PROMPT_MODES,
                        help="empty, class ('a photo of a {category}', the default for --model) or caption "
                             "(per-image captions from --captions)")
    source.add_argument("--captions", help="JSON {category + image file name: caption} (DiTF authors' format)")
    source.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: bf16 on CUDA, fp32 on CPU)")
    source.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    source.add_argument("--cache", help="feature cache folder (default $DITF_CACHE_DIR/features or ~/.cache/ditf/features)")
    source.add_argument("--cache-dtype", choices=["float32", "float16", "bfloat16"], help="store cached maps in this dtype")
    source.add_argument("--shard", help="i/n (0 <= i < n) or 'auto' (RANK/WORLD_SIZE): only fill the cache for this share")
    source.add_argument("--cache-only", action="store_true", help="score from the cache; never run the model")
    return parser


def run_spair(args: argparse.Namespace) -> int:
    """`ditf eval spair`."""
    dataset = load_spair(args.root, args.split, args.categories, parse_filters(args.filter), args.layout)
    return run_benchmark(args, dataset)


def run_pfpascal(args: argparse.Namespace) -> int:
    """`ditf eval pfpascal`."""
    dataset = load_pfpascal(args.root, args.split, args.categories, with_boxes=args.threshold == "bbox")
    return run_benchmark(args, dataset)


def run_ap10k(args: argparse.Namespace) -> int:
    """`ditf eval ap10k`."""
    dataset = load_ap10k(args.root, args.subset, args.split, args.categories)
    return run_benchmark(args, dataset)


def run_benchmark(args: argparse.Namespace, dataset: CorrespondenceDataset) -> int:
    """Extract (a shard of) features or score `dataset`, print the protocol card and the table,
    and write the results files."""
    protocol = protocol_for(dataset, args.protocol, args.threshold, args.matcher, args.pad_size)
    progress = not args.quiet
    chosen = [flag for flag, value in (("--features", args.features), ("--model", args.model),
                                       ("--baseline", args.baseline)) if value is not None]
    if len(chosen) != 1:
        raise InvalidArgumentError(
            "pass exactly one of --features DIR (precomputed maps), --model ALIAS (extract with DiTFeaturizer) or "
            f"--baseline NAME (dift, dinov2-b14, dinov2-l14); got {', '.join(chosen) or 'none'}"
        )
    if args.features is not None:
        model_only = [flag for flag, value in (("--shard", args.shard), ("--cache-only", args.cache_only),
                                               ("--cache", args.cache)) if value]
        if model_only:
            raise InvalidArgumentError(f"{', '.join(model_only)} only apply with --model or --baseline, not --features")
        source = FeatureFolder(args.features)
    else:
        source = extractor_from_args(args) if args.model is not None else baseline_extractor_from_args(args)
        if args.shard is not None:
            summary = extract_shard(dataset, source, parse_shard(args.shard), progress)
            print(json.dumps(summary))
            if summary["missing_in_dataset"]:
                print(f"{summary['missing_in_dataset']} images still lack features; score with --cache-only once "
                      "every shard has finished")
            return 0

    results = evaluate(dataset, source, protocol, settings=source.describe(), progress=progress)
    print(markdown_table(results))
    if args.output:
        for path in write_results(results, args.output, dataset, plot=args.plot, num_plot_pairs=args.plot_pairs):
            print(f"wrote {path}")
    else:
        print(format_protocol_card(results["protocol"]))
    return 0
