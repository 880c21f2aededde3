"""`ditf features` and `ditf match`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ditf.cli.common import add_model_args, feature_settings, featurizer_from_args
from ditf.errors import InvalidArgumentError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `features` and `match`."""
    features = subparsers.add_parser("features", help="DiTF features of images, one safetensors file per image")
    features.add_argument("images", nargs="+", help="image files")
    features.add_argument("-o", "--output", required=True, help="output folder")
    features.add_argument("--half", action="store_true", help="store fp16 features")
    features.add_argument("--overwrite", action="store_true", help="recompute files that already exist")
    add_model_args(features)
    features.set_defaults(func=run_features)

    match = subparsers.add_parser("match", help="match points from a source image into a target image")
    match.add_argument("source")
    match.add_argument("target")
    match.add_argument("--points", required=True, help="source points 'x,y;x,y' in pixels")
    match.add_argument("-o", "--output", required=True, help="figure path (.png or .pdf)")
    add_model_args(match)
    match.set_defaults(func=run_match)


def run_features(args: argparse.Namespace) -> int:
    """Write `<output>/<image stem>.safetensors` per image; existing files with the same settings are kept."""
    from tqdm.auto import tqdm

    from ditf import __version__
    from ditf.features.io import load_features, save_features
    from ditf.features.preprocess import load_image

    images = [Path(p) for p in args.images]
    stems = [p.stem for p in images]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise InvalidArgumentError(f"several images share the file name stem(s) {duplicates}; their feature files would collide.")
    for image in images:
        load_image(image)  # fail on a missing or corrupt file before loading a model
    fx = featurizer_from_args(args)
    settings = feature_settings(args, fx)
    record = {"model": args.model, **settings, "dtype": str(fx.dtype).replace("torch.", ""), "ditf_version": __version__}
    output = Path(args.output)
    for image in tqdm(images, desc="features", unit="image"):
        target = output / f"{image.stem}.safetensors"
        entry = {**record, "image": str(image)}
        if target.exists() and not args.overwrite and load_features(target)[1] == entry:
            continue
        feats = fx([image], progress=False, **settings)[0]
        save_features(target, feats, entry, half=args.half)
    print(f"wrote {len(images)} feature files to {output}")
    return 0


def run_match(args: argparse.Namespace) -> int:
    """Print the matched points as JSON and save the figure."""
    from ditf.features.preprocess import load_image
    from ditf.matching.pair import check_points_inside, match_pair, parse_points, plot_pair_matches

    points = parse_points(args.points)
    source, target = load_image(args.source), load_image(args.target)
    check_points_inside(points, (source.height, source.width))
    fx = featurizer_from_args(args)
    feats = fx([source, target], progress=False, **feature_settings(args, fx))
    match = match_pair(feats[0], feats[1], points, (source.height, source.width), (target.height, target.width))
    plot_pair_matches(source, target, match, args.output)
    json.dump(match.to_json(), sys.stdout)
    print()
    return 0
