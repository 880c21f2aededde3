"""Options shared by commands that run a DiT: which model, where, and its `FeatureSettings`.

Nothing here imports torch at module level, so `ditf <command> --help` stays fast. Flags that are not given
stay out of the settings overrides, so `ditf.settings.resolve_settings` alone decides every default.
"""

from __future__ import annotations

import argparse
from typing import Any

from ditf.errors import InvalidArgumentError
from ditf.settings import DTYPES, VAE_SAMPLES, VARIANTS, FeatureSettings, resolve_settings


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default in `--help` (omitted where the default is "not given")."""


def add_model_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """Add --model and where / how it is loaded."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=required,
                       help="preset alias (e.g. flux-dev), hub id, local diffusers folder or single-file checkpoint")
    group.add_argument("--config", help="folder with the diffusers config.json, for single-file checkpoints")
    group.add_argument("--weights-variant", help="weight files variant to load, e.g. fp16 (*.fp16.safetensors)")
    group.add_argument("--dtype", choices=list(DTYPES), help="weights dtype (default: bf16 on CUDA, fp32 elsewhere)")
    group.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    group.add_argument("--offload", choices=["model", "sequential"],
                       help="keep weights on the CPU and move them to the device when used (accelerate)")


def add_settings_args(parser: argparse.ArgumentParser, *, image_size: bool = True) -> None:
    """Add the `FeatureSettings` options (each defaults to the model's preset; see `ditf presets`)."""
    group = parser.add_argument_group("DiTF settings (default: the model's preset)")
    group.add_argument("--block", type=int, help="global block index k")
    group.add_argument("--t", type=float, help="timestep in 0..1000")
    group.add_argument("--ensemble", type=int, help="number of noise draws averaged")
    if image_size:
        group.add_argument("--resolution", type=int, help="long image side in pixels")
        group.add_argument("--size", type=parse_size, help="exact image size HxW in pixels, e.g. 512x640 (multiples of the stride)")
        group.add_argument("--pad-square", action="store_true", default=None, help="pad the resized image to a square")
    group.add_argument("--prompt", help="text prompt (default: empty)")
    group.add_argument("--discard", help="massive channels to zero: auto, none, or indices like 154,1446 (default: auto)")
    group.add_argument("--massive-ratio", type=float,
                       help="auto discard without known channels: median |z| at least this many times the median (default: 100)")
    group.add_argument("--variant", choices=list(VARIANTS),
                       help="the paper's ablation: raw, ln (LayerNorm), adaln (+modulation), ditf (+discard; default)")
    group.add_argument("--guidance", type=float, help="embedded guidance of FLUX.1-dev / FLUX.2-dev (default: the model's)")
    group.add_argument("--seed", type=int, help="noise seed (default: 0)")
    group.add_argument("--vae-sample", choices=list(VAE_SAMPLES), help="VAE posterior: a sample per member, shared, or the mode")
    group.add_argument("--max-batch", type=int, help="ensemble members per forward pass (default: all)")


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


def resolve_cli_settings(args: argparse.Namespace, task: str | None = None, **fixed: Any) -> FeatureSettings:
    """The `FeatureSettings` of the command: the model's (task) preset changed by the given flags and `fixed`.

    Resolved before any model loads, so a missing or invalid setting is reported at once.
    """
    from ditf.registry import preset_for

    return resolve_settings(preset_for(args.model), task=task, model=args.model, dtype=args.dtype,
                            **{**settings_overrides(args), **fixed})


def device_of(args: argparse.Namespace) -> str:
    """--device, or CUDA when available (cuda:<LOCAL_RANK> under torchrun / accelerate), else cpu."""
    from ditf.eval.extractors import default_device

    return args.device or default_device()


def load_featurizer(args: argparse.Namespace, settings: FeatureSettings) -> Any:
    """The `DiTFeaturizer` of --model, loaded only up to the settings' block, on --device (or offloaded)."""
    from ditf.features.featurizer import DiTFeaturizer
    from ditf.settings import torch_dtype

    device = device_of(args)
    return DiTFeaturizer.from_pretrained(args.model, torch_dtype=torch_dtype(settings.dtype, device), device=device,
                                         block=settings.block if settings.block >= 0 else None, offload=args.offload,
                                         config=args.config, variant=args.weights_variant)


def check_exclusive(args: argparse.Namespace, needed: str, **options: str) -> None:
    """Refuse `options` (argparse destination -> flag) given without `needed`."""
    given = [flag for name, flag in options.items() if getattr(args, name, None) not in (None, False)]
    if given:
        raise InvalidArgumentError(f"{', '.join(given)} only apply together with {needed}; add {needed} or drop them.")
