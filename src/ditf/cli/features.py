"""`ditf features` and `ditf match`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ditf.cli.common import HelpFormatter, add_model_args, add_settings_args, load_featurizer, resolve_cli_settings
from ditf.cli.outputs import FIGURE_SUFFIXES, check_output_file, check_output_folder
from ditf.errors import InvalidArgumentError


RANDOM_WEIGHTS_NOTE = "random-weight smoke model: these matches are meaningless"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `features` and `match`."""
    features = subparsers.add_parser(
        "features", help="DiTF features of images, one safetensors file per image", formatter_class=HelpFormatter,
        description="DiTF features of images: <output>/<image path relative to the images' common folder>.safetensors "
                    "(tensor 'features' (C, h, w), the settings in the metadata). Images of SPair's "
                    "JPEGImages/<category>/ folders land in <output>/<category>/, the layout `ditf eval --features` reads.")
    features.add_argument("images", nargs="+", help="image files")
    features.add_argument("-o", "--output", required=True, help="output folder")
    features.add_argument("--half", action="store_true", help="store fp16 features (half the size)")
    features.add_argument("--overwrite", action="store_true", help="recompute files that are already up to date")
    add_model_args(features)
    add_settings_args(features)
    features.set_defaults(func=run_features)

    match = subparsers.add_parser("match", help="match points from a source image into a target image",
                                  formatter_class=HelpFormatter,
                                  description="Match source points into the target image with DiTF features (exact "
                                              "full-resolution cosine argmax); print the matches as JSON and draw them.")
    match.add_argument("source", help="source image file")
    match.add_argument("target", help="target image file")
    match.add_argument("--points", required=True, help="source points 'x,y;x,y' in pixels")
    match.add_argument("-o", "--output", required=True, help="figure file (.png, .pdf, ...) or folder (match.png inside)")
    add_model_args(match)
    add_settings_args(match)
    match.set_defaults(func=run_match)


def feature_files(images: list[Path], output: Path) -> list[Path]:
    """Where `ditf features` writes each image's map: its path relative to the images' deepest common folder,
    under `output`, with the suffix `.safetensors`. Refuses two images that would share a file."""
    resolved = [image.resolve() for image in images]
    common = Path(os.path.commonpath([image.parent for image in resolved]))
    targets = [output / image.relative_to(common).with_suffix(".safetensors") for image in resolved]
    clashing = sorted({str(t) for t in targets if targets.count(t) > 1})
    if clashing:
        raise InvalidArgumentError(
            f"several images would write the same feature file {clashing}: they differ only in their suffix; "
            "rename one of them or run them separately."
        )
    return targets


def run_features(args: argparse.Namespace) -> int:
    """Write one feature file per image; a file already holding this image's features with these settings is kept."""
    from tqdm.auto import tqdm

    from ditf.eval.cache import file_sha256, keyed_settings
    from ditf.features.io import read_feature_header, save_features
    from ditf.errors import DatasetError
    from ditf.features.preprocess import load_image
    from ditf.fingerprint import model_identity
    from ditf.loading import check_model
    from ditf.versions import ditf_version

    images = [Path(p) for p in args.images]
    for image in images:
        load_image(image)  # fail on a missing or corrupt file before loading a model
    settings = resolve_cli_settings(args)
    check_model(args.model, needs=("transformer", "vae"), config=args.config)
    targets = feature_files(images, check_output_folder(args.output, "--output"))
    identity = model_identity(args.model, config=args.config)
    wanted = {"settings": keyed_settings({**settings.to_dict(), "model_identity": identity}), "half": args.half}
    todo = []
    for image, target in zip(images, targets):
        record = {**wanted, "image_sha256": file_sha256(image)}
        try:
            existing = read_feature_header(target).settings if target.is_file() and not args.overwrite else None
        except DatasetError:
            existing = None
        if existing is None or {key: existing.get(key) for key in record} != record:
            todo.append((image, target, record))
    if todo:
        import torch

        fx = load_featurizer(args, settings)
        for image, target, record in tqdm(todo, desc="features", unit="image", disable=len(todo) < 2):
            result = fx.extract(image, settings=settings, max_batch=args.max_batch)
            save_features(target, result.features, dtype=torch.float16 if args.half else None,
                          settings={**record, "image": str(image), "discarded": result.discarded,
                                    "resolved": result.settings.to_dict(), "ditf_version": ditf_version()})
    print(f"wrote {len(todo)}, skipped {len(images) - len(todo)} (up to date) feature files in {args.output}")
    return 0


def run_match(args: argparse.Namespace) -> int:
    """Print the matched points as JSON and save the figure."""
    from ditf.features.preprocess import load_image
    from ditf.loading import check_model
    from ditf.matching.pair import match_pair, parse_points, plot_pair_matches
    from ditf.smoke import is_smoke_model
    from ditf.matching.points import check_points_inside

    points = parse_points(args.points)
    source, target = load_image(args.source), load_image(args.target)
    check_points_inside(points, (source.height, source.width), "--points")
    output = Path(args.output)
    if output.is_dir() or args.output.endswith(("/", os.sep)):
        output = output / "match.png"
    check_output_file(output, "--output", FIGURE_SUFFIXES)
    settings = resolve_cli_settings(args)
    check_model(args.model, needs=("transformer", "vae"), config=args.config)
    fx = load_featurizer(args, settings)
    feats = fx([source, target], settings=settings, max_batch=args.max_batch, progress=False)
    match = match_pair(feats[0], feats[1], points, (source.height, source.width), (target.height, target.width))
    random_weights = is_smoke_model(args.model)
    plot_pair_matches(source, target, match, output,
                      title=RANDOM_WEIGHTS_NOTE if random_weights else None)
    json.dump({**match.to_json(), **({"random_weights": RANDOM_WEIGHTS_NOTE} if random_weights else {})}, sys.stdout)
    print()
    return 0
