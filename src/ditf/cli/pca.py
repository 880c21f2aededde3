"""`ditf pca`: one figure with each image above the PCA picture of its DiTF features."""

from __future__ import annotations

import argparse

from ditf.cli.common import add_model_args, feature_settings, featurizer_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `pca`."""
    parser = subparsers.add_parser(
        "pca", help="PCA pictures: the first three principal components of the images' features, fitted jointly, as RGB"
    )
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("-o", "--output", required=True, help="figure path (.png or .pdf)")
    parser.add_argument("--foreground", action="store_true",
                        help="DINOv2-style: cut the first component to find the foreground, refit on it, black background")
    parser.add_argument("--threshold", type=float, default=None,
                        help="foreground cut on the first component scaled to [0, 1] (default 0.5)")
    add_model_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Extract features of every image with one model and settings, colour them, save the figure."""
    from pathlib import Path

    from ditf.errors import InvalidArgumentError
    from ditf.features.preprocess import load_image
    from ditf.smoke_cache import is_smoke_model
    from ditf.viz import pca_rgb, save_pca_figure

    if args.threshold is not None and not args.foreground:
        raise InvalidArgumentError(f"--threshold {args.threshold} only applies with --foreground; add --foreground.")
    images = [load_image(path) for path in args.images]  # fail on a missing or corrupt file before loading a model
    fx = featurizer_from_args(args)
    settings = feature_settings(args, fx)
    feats = fx(images, progress=False, **settings)
    pictures = pca_rgb([feats[i] for i in range(len(images))], [(im.height, im.width) for im in images],
                       foreground=args.foreground, threshold=args.threshold)
    name = Path(args.model).name if Path(args.model).exists() else args.model
    title = (f"PCA of {name} features\nblock {settings['block']}, t={settings['t']:g}, ensemble {settings['ensemble']}, "
             f"{settings['resolution']} px" + (", foreground only" if args.foreground else ""))
    if is_smoke_model(args.model):
        title = "RANDOM-WEIGHT smoke model: meaningless features\n" + title
    path = save_pca_figure(images, pictures, args.output, title=title, labels=[Path(p).name for p in args.images])
    print(f"wrote {path}")
    return 0
