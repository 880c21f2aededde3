"""`ditf sweep spair | ap10k | pfpascal` and `ditf presets`: find a model's best block and timestep, keep it."""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

from ditf.cli.common import (
    HelpFormatter,
    add_model_args,
    add_scoring_args,
    add_settings_args,
    check_scoring_processes,
    device_of,
    quiet_loading,
    resolve_cli_settings,
)
from ditf.cli.outputs import check_output_file, check_output_folder
from ditf.errors import InvalidArgumentError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `sweep <benchmark>` and `presets`."""
    sweep = subparsers.add_parser("sweep", help="find the best block and timestep of a model on a benchmark",
                                  description="Score every (block, t) of a model on a seeded subset of a benchmark's "
                                              "pairs, one extraction of all blocks per image and timestep.")
    benchmarks = sweep.add_subparsers(dest="benchmark", required=True)
    for name in ("spair", "ap10k", "pfpascal"):
        parser = benchmarks.add_parser(name, formatter_class=HelpFormatter, help=f"sweep on {name}")
        parser.add_argument("--root", required=True, help="dataset folder")
        parser.add_argument("--split", default="val", help="dataset split to choose on (never the test split you report)")
        if name == "ap10k":
            parser.add_argument("--subset", default="intra-species", help="GeoAware-SC's pair subset")
        parser.add_argument("--pairs", type=int, default=300, help="pairs drawn from the split (seeded)")
        parser.add_argument("--pair-seed", type=int, default=0, help="seed of the pair draw")
        parser.add_argument("--blocks", required=True, help="blocks to score: 4-22:2, 12,16,20, ...")
        parser.add_argument("--t", dest="timesteps", required=True, help="timesteps to score: 50,150,261")
        parser.add_argument("-o", "--output", required=True, help="folder for sweep.json and the figures")
        parser.add_argument("--write-preset", metavar="FILE", help="write (or update) the best setting as a preset in FILE")
        parser.add_argument("--cache", help="feature cache folder (default $DITF_CACHE_DIR/features)")
        parser.add_argument("--shard", help="i/n: only extract this share of the images (then run without --shard)")
        add_scoring_args(parser)
        parser.add_argument("--prompt-mode", choices=["empty", "class"], help="prompts (default: the task's, class)")
        parser.add_argument("--quiet", action="store_true", help="no progress bars")
        add_model_args(parser)
        add_settings_args(parser, block_and_t=False)
        parser.set_defaults(func=run_sweep)

    presets = subparsers.add_parser("presets", formatter_class=HelpFormatter,
                                    help="every preset, its numbers and where they come from",
                                    description="List the built-in presets and the user presets in force "
                                                "($DITF_PRESETS, --presets), with the source of their numbers.")
    presets.add_argument("--presets", action="append", default=[], metavar="FILE", help="also these user preset files")
    presets.add_argument("--json", action="store_true", help="print JSON instead of a table")
    presets.set_defaults(func=run_presets)


def run_sweep(args: argparse.Namespace) -> int:
    """Sweep, write the results and figures, print the best setting (and write it as a preset)."""
    from ditf.eval.extractors import DiTFExtractor, default_cache_dir
    from ditf.eval.sweep import parse_blocks, parse_timesteps, subset_pairs, sweep

    from ditf.cli.eval_sources import refuse_prompt

    blocks, timesteps = parse_blocks(args.blocks), parse_timesteps(args.timesteps)
    check_scoring_processes(args)
    if args.pairs < 1:
        raise InvalidArgumentError(f"--pairs {args.pairs}: give at least 1 (pairs drawn from the split).")
    refuse_prompt(args)
    quiet_loading()
    output = check_output_folder(args.output, "--output")
    settings = resolve_cli_settings(args, task=args.benchmark, block=blocks[-1], t=timesteps[0])
    check_write_preset(args, settings)
    extractor = DiTFExtractor(args.model, settings.replace(block=tuple(blocks) if len(blocks) > 1 else blocks[0]),
                              task=args.benchmark, device=device_of(args), offload=args.offload, config=args.config,
                              variant_files=args.weights_variant)
    dataset = subset_pairs(_load(args), args.pairs, args.pair_seed)
    try:
        results = sweep(dataset, extractor, blocks, timesteps, cache_dir=args.cache or default_cache_dir(),
                        prompt_mode=args.prompt_mode, shard=args.shard, workers=args.workers, threads=args.threads,
                        output=None if args.shard else output, progress=not args.quiet)
    except InvalidArgumentError as err:
        if not str(err).startswith("block="):  # the model's range, found when its deepest block is loaded
            raise
        raise InvalidArgumentError(f"--blocks {args.blocks}: block {str(err).removeprefix('block=')}") from err
    if args.shard:
        print(json.dumps(results))
        return 0
    best = results["best"]
    print(f"best: block {best['block']}, t {best['t']:g}: PCK@{results['alpha']} {best['per_point']:.2f} per point, "
          f"{best['per_image']:.2f} per image ({len(dataset.pairs)} pairs of {args.benchmark} {args.split})")
    print(f"wrote {output / 'sweep.json'}, {output / 'sweep_heatmap.png'} and {output / 'sweep_lines.png'}")
    if args.write_preset:
        path = write_sweep_preset(args, settings, results)
        print(f"wrote the preset {args.model!r} to {path}; use it with DITF_PRESETS={path} or --presets {path}")
    return 0


def write_sweep_preset(args: argparse.Namespace, settings, results: dict) -> Path:
    """The sweep's best block and t as a user preset named after --model, with its provenance."""
    from ditf.registry import write_preset
    from ditf.versions import ditf_version

    best = results["best"]
    provenance = {"benchmark": args.benchmark, "split": args.split, "pairs": results["benchmark"]["pairs"],
                  "seed": args.pair_seed, "date": datetime.date.today().isoformat(), "ditf_version": ditf_version(),
                  "best_pck_per_point": round(best["per_point"], 4), "best_pck_per_image": round(best["per_image"], 4),
                  "blocks": results["blocks"], "timesteps": results["t"]}
    return write_preset(args.write_preset, args.model, model=preset_model(args.model), block=best["block"], t=best["t"],
                        resolution=settings.resolution, ensemble=settings.ensemble, verified=True, provenance=provenance)


def preset_model(model: str) -> str | None:
    """What a user preset named `model` records as its model: nothing for a built-in alias (it keeps its hub id),
    the resolved path of a local model, else the hub id itself."""
    from ditf.registry import PRESETS

    if model in PRESETS:
        return None
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def check_write_preset(args: argparse.Namespace, settings) -> None:
    """Before the sweep: the preset file can be written and read, and the settings have what a preset needs."""
    from ditf.registry import read_preset_file

    if args.write_preset is None:
        return
    target = Path(args.write_preset)
    check_output_file(target, "--write-preset", (".toml",))
    if target.is_file():
        read_preset_file(target)
    if settings.resolution is None:
        raise InvalidArgumentError("--write-preset: a preset keeps a --resolution (the long image side); sweep with "
                                   "--resolution instead of --size.")


def _load(args: argparse.Namespace):
    if args.benchmark == "spair":
        from ditf.eval.spair import load_spair

        return load_spair(args.root, args.split)
    if args.benchmark == "pfpascal":
        from ditf.eval.pfpascal import load_pfpascal

        return load_pfpascal(args.root, args.split)
    from ditf.eval.ap10k import load_ap10k

    return load_ap10k(args.root, args.subset, args.split)


def run_presets(args: argparse.Namespace) -> int:
    """Print every preset in force with its numbers and their source."""
    from ditf.registry import all_presets, preset_files

    with preset_files(args.presets):
        presets = all_presets()
    rows = [{"alias": p.alias, "model": p.hub_id, "family": p.family, "block": p.block, "t": p.t,
             "resolution": p.resolution, "ensemble": p.ensemble, "verified": p.verified, "origin": p.origin,
             "source": p.source} for p in presets.values()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| alias | model | block | t | res | ensemble | verified | origin | source |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        origin = "built-in" if row["origin"] == "built-in" else f"user: {os.path.basename(row['origin'])}"
        print(f"| {row['alias']} | {row['model']} | {row['block']} | {row['t']:g} | {row['resolution']} | "
              f"{row['ensemble']} | {'yes' if row['verified'] else 'no'} | {origin} | {row['source']} |")
    return 0
