"""Options shared by commands that run a DiT: which model, where, and its `FeatureSettings`.

Nothing here imports torch at module level, so `ditf <command> --help` stays fast. Flags that are not given
stay out of the settings overrides, so `ditf.settings.resolve_settings` alone decides every default.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ditf.errors import InvalidArgumentError
from ditf.settings import DTYPES, VAE_SAMPLES, VARIANTS, FeatureSettings, default_dtype, resolve_settings


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default in `--help`; options whose default is "not given" (None, False) say in their
    help what applies instead (usually the model's preset)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default in (None, False, [], "", argparse.SUPPRESS) or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


def add_model_args(parser: argparse.ArgumentParser, *, required: bool = True, model_help: str | None = None) -> None:
    """Add --model and where / how it is loaded."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=required, help=model_help or
                       "preset alias (e.g. flux-dev), hub id, local diffusers folder or single-file checkpoint")
    group.add_argument("--config", help="folder with the diffusers config.json, for single-file checkpoints")
    group.add_argument("--weights-variant", help="weight files variant to load, e.g. fp16 (*.fp16.safetensors)")
    group.add_argument("--dtype", choices=list(DTYPES), help="weights dtype (default: bf16 on CUDA, fp32 elsewhere)")
    group.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    group.add_argument("--offload", choices=["model", "sequential"],
                       help="keep weights on the CPU and move them to the device when used (accelerate)")
    group.add_argument("--presets", action="append", default=[], metavar="FILE",
                       help="user preset files (TOML, e.g. from `ditf sweep --write-preset`), after $DITF_PRESETS")


def add_settings_args(parser: argparse.ArgumentParser, *, image_size: bool = True, block_and_t: bool = True,
                      discard: bool = True, max_pixels: bool = True,
                      title: str = "DiTF settings (default: the model's preset)") -> argparse._ArgumentGroup:
    """Add the `FeatureSettings` options (each defaults to the model's preset; see `ditf presets`); return the
    group, for a command's own options of the same kind."""
    group = parser.add_argument_group(title)
    if block_and_t:
        group.add_argument("--block", type=int, help="global block index k")
        group.add_argument("--t", type=float, help="timestep in 0..1000")
    group.add_argument("--ensemble", type=int, help="number of noise draws averaged")
    if image_size:
        group.add_argument("--resolution", type=int, help="long image side in pixels")
        group.add_argument("--size", type=parse_size, help="exact image size HxW in pixels, e.g. 512x640 (multiples of the stride)")
        group.add_argument("--pad-square", action="store_true", default=None, help="pad the resized image to a square")
    group.add_argument("--prompt", help="text prompt (default: empty)")
    if discard:
        group.add_argument("--discard", help="massive channels to zero: auto, none, or indices like 154,1446 (default: auto)")
    group.add_argument("--massive-ratio", type=float,
                       help="auto discard without known channels: median |z| at least this many times the median (default: 100)")
    group.add_argument("--variant", choices=list(VARIANTS),
                       help="the paper's ablation: raw, ln (LayerNorm), adaln (+modulation), ditf (+discard; default)")
    group.add_argument("--guidance", type=float, help="embedded guidance of FLUX.1-dev / FLUX.2-dev (default: the model's)")
    group.add_argument("--seed", type=int, help="noise seed (default: 0)")
    group.add_argument("--vae-sample", choices=list(VAE_SAMPLES), help="VAE posterior: a sample per member, shared, or the mode")
    group.add_argument("--max-batch", type=int, help="ensemble members per forward pass (default: all)")
    if max_pixels:
        add_max_pixels(parser)
    return group


def add_max_pixels(parser: argparse.ArgumentParser, *, default: int | None = None,
                   help_text: str = "largest input image in pixels (width x height) (default: 100000000)") -> None:
    """Add --max-pixels, the largest input image read (see `ditf.features.preprocess.MAX_PIXELS`)."""
    parser.add_argument("--max-pixels", type=int, default=default, help=help_text)


@contextmanager
def max_pixels_limit(args: argparse.Namespace) -> Iterator[None]:
    """Inside the block, --max-pixels is the limit of every image read (and PIL's own, when higher)."""
    limit = getattr(args, "max_pixels", None)
    if limit is None:
        yield
        return
    if limit < 1:
        raise InvalidArgumentError(f"--max-pixels {limit} must be at least 1.")
    from PIL import Image

    from ditf.features import preprocess

    previous = preprocess.MAX_PIXELS, Image.MAX_IMAGE_PIXELS
    preprocess.MAX_PIXELS = limit
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, limit)
    try:
        yield
    finally:
        preprocess.MAX_PIXELS, Image.MAX_IMAGE_PIXELS = previous


def parse_size(text: str) -> tuple[int, int]:
    """'512x640' (height x width) -> (512, 640)."""
    height, sep, width = text.lower().partition("x")
    if not sep or not height.strip().isdigit() or not width.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH in pixels, e.g. 512x640")
    return int(height), int(width)


SETTING_OPTIONS = ("block", "t", "ensemble", "resolution", "size", "pad_square", "prompt", "discard", "massive_ratio",
                   "guidance", "seed", "vae_sample")
"""The settings options above, by argparse destination (= `FeatureSettings` field)."""


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `FeatureSettings` fields the command line gave (flags not given are left out; --variant expands)."""
    overrides: dict[str, Any] = {}
    variant = getattr(args, "variant", None)
    if variant is not None:
        overrides.update(VARIANTS[variant])
    for name in SETTING_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return overrides


def add_scoring_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--workers and --threads: how the pairs of a correspondence benchmark are scored (`check_scoring_processes`)."""
    parser.add_argument("--workers", type=int, default=1,
                        help="CPU processes scoring pairs in parallel, whole targets to a process; each uses one "
                             "torch thread (the small float64 products of the matcher slow down when split over "
                             "threads), so give as many workers as free cores")
    parser.add_argument("--threads", type=int,
                        help="torch threads of each scoring process (default: 1 on the CPU, where more only slow the "
                             "matcher's small products down: use --workers; torch's setting on a GPU)")


def check_scoring_processes(args: argparse.Namespace) -> None:
    """InvalidArgumentError unless --workers and --threads (when given) are at least 1."""
    if args.workers < 1:
        raise InvalidArgumentError(f"--workers {args.workers}: give at least 1 (processes scoring pairs).")
    if args.threads is not None and args.threads < 1:
        raise InvalidArgumentError(f"--threads {args.threads}: give at least 1 (torch threads per scoring process), "
                                   "or leave it out.")


def setting_flags(args: argparse.Namespace) -> list[str]:
    """The feature-setting flags the command line gave, as typed (`--variant`, not the settings it expands to)."""
    given = ["--variant"] if getattr(args, "variant", None) is not None else []
    return given + [f"--{name.replace('_', '-')}" for name in SETTING_OPTIONS if getattr(args, name, None) is not None]


def resolve_cli_settings(args: argparse.Namespace, task: str | None = None, **fixed: Any) -> FeatureSettings:
    """The `FeatureSettings` of the command: the model's (task) preset changed by the given flags and `fixed`.

    Resolved before any model loads, so a missing or invalid setting is reported at once.
    """
    from ditf.loading import check_model_reference
    from ditf.registry import preset_for

    check_model_reference(args.model)
    max_batch = getattr(args, "max_batch", None)
    if max_batch is not None and max_batch < 1:
        raise InvalidArgumentError(f"--max-batch {max_batch}: give at least 1 ensemble member per forward pass "
                                   "(leave it out to run all members at once).")
    dtype = args.dtype or default_dtype(device_of(args))
    return resolve_settings(preset_for(args.model), task=task, model=args.model, dtype=dtype,
                            **{**settings_overrides(args), **fixed})


def quiet_loading() -> None:
    """Hide diffusers' and transformers' loading bars and notices while a model loads, unless --verbose."""
    import os

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    quiet = os.environ.get("DITF_QUIET_LIBRARIES") == "1"
    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar() if quiet else library.enable_progress_bar()
        library.set_verbosity_error() if quiet else library.set_verbosity_warning()


def device_of(args: argparse.Namespace) -> str:
    """--device, or CUDA when available (cuda:<LOCAL_RANK> under torchrun / accelerate), else cpu."""
    from ditf.eval.extractors import default_device
    from ditf.features.featurizer import check_device

    if getattr(args, "device", None) is None:
        return default_device()
    check_device(args.device, "device")
    return args.device


def load_featurizer(args: argparse.Namespace, settings: FeatureSettings) -> Any:
    """The `DiTFeaturizer` of --model, loaded only up to the settings' block, on --device (or offloaded)."""
    from ditf.features import featurizer

    quiet_loading()
    return featurizer.load_featurizer(args.model, device=device_of(args), dtype=settings.dtype,
                                      block=settings.load_up_to, offload=args.offload, config=args.config,
                                      variant=args.weights_variant)


def check_exclusive(args: argparse.Namespace, needed: str, **options: str) -> None:
    """Refuse `options` (argparse destination -> flag) given without `needed`."""
    given = [flag for name, flag in options.items() if getattr(args, name, None) not in (None, False)]
    if given:
        raise InvalidArgumentError(f"{', '.join(given)} only apply together with {needed}; add {needed} or drop them.")
