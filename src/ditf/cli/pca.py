"""`ditf pca`: one figure with each image above the PCA picture of its DiTF features."""

from __future__ import annotations

import argparse

from ditf.cli.common import HelpFormatter, add_model_args, add_settings_args

PCA_FIGURE = "pca.png"
"""The figure's name when -o names a folder."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `pca`."""
    parser = subparsers.add_parser(
        "pca", formatter_class=HelpFormatter,
        help="PCA pictures: the first three principal components of the images' features, fitted jointly, as RGB",
        description="Extract the DiTF features of every image with one model and settings, fit the first three "
                    "principal components jointly over all of them, and draw each image above its components "
                    "shown as red, green and blue at image resolution.")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("-o", "--output", required=True, help=f"figure file (.png, .pdf, ...) or folder ({PCA_FIGURE} inside)")
    parser.add_argument("--foreground", action="store_true",
                        help="DINOv2-style: cut the first component to find the foreground, refit on it, black background")
    parser.add_argument("--threshold", type=float,
                        help="with --foreground: the cut on the first component scaled to [0, 1] (default: 0.5)")
    add_model_args(parser)
    add_settings_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check the inputs and the output, extract every image's features, colour them, save the figure."""
    import os
    from pathlib import Path

    from ditf.cli.common import check_exclusive, load_featurizer, resolve_cli_settings
    from ditf.cli.outputs import FIGURE_SUFFIXES, check_output_file
    from ditf.features.preprocess import load_image
    from ditf.loading import check_model
    from ditf.smoke import is_smoke_model
    from ditf.viz import check_threshold, pca_rgb, save_pca_figure

    if not args.foreground:
        check_exclusive(args, "--foreground", threshold="--threshold")
    check_threshold(args.threshold, args.foreground)
    output = Path(args.output)
    if output.is_dir() or args.output.endswith(("/", os.sep)):
        output = output / PCA_FIGURE
    check_output_file(output, "--output", FIGURE_SUFFIXES)
    images = [load_image(path) for path in args.images]  # a missing or corrupt file fails before any model loads
    settings = resolve_cli_settings(args)
    check_model(args.model, needs=("transformer", "vae"), config=args.config)
    fx = load_featurizer(args, settings)
    feats = fx(images, settings=settings, max_batch=args.max_batch, progress=False)
    pictures = pca_rgb(feats, [(image.height, image.width) for image in images], foreground=args.foreground,
                       threshold=args.threshold)
    name = Path(args.model).name if Path(args.model).exists() else args.model
    size = f"{settings.resolution} px" if settings.resolution is not None else f"{settings.size[0]}x{settings.size[1]} px"
    title = (f"PCA of {name} features\nblock {settings.block}, t={settings.t:g}, ensemble {settings.ensemble}, {size}, "
             f"{settings.variant}" + (", foreground only" if args.foreground else ""))
    if is_smoke_model(args.model):
        title = "RANDOM-WEIGHT smoke model: meaningless features\n" + title
    save_pca_figure(images, pictures, output, title=title, labels=[Path(p).name for p in args.images])
    print(f"wrote {output}")
    return 0
