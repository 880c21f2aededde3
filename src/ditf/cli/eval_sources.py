"""Where an evaluation command's features come from: `--features DIR`, `--model` or `--baseline`, and the cache.

Shared by `ditf eval spair | pfpascal | ap10k | hpatches | ade20k`: the flags, and the feature-source keywords of
the library's `evaluate_*` functions they turn into. Nothing here imports torch at module level.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from ditf.cli.common import device_of, quiet_loading, resolve_cli_settings, setting_flags
from ditf.errors import InvalidArgumentError
from ditf.settings import DTYPES



def add_source_args(parser: argparse.ArgumentParser, layout: str) -> None:
    """Add --features (maps laid out as `layout` under DIR), --baseline and the feature-cache flags."""
    source = parser.add_argument_group("features (exactly one of --features / --model / --baseline)")
    source.add_argument("--features", help=f"folder of {layout} (tensor 'features', (C, h, w))")
    source.add_argument("--baseline", help="baseline extractor from ditf.baselines: dift, dinov2-b14, dinov2-l14")
    source.add_argument("--cache", help="feature cache folder (default $DITF_CACHE_DIR/features or ~/.cache/ditf/features)")
    source.add_argument("--cache-dtype", choices=list(DTYPES), help="store cached maps in this dtype")
    source.add_argument("--shard", help="i/n (0 <= i < n) or 'auto' (RANK/WORLD_SIZE): only fill the cache for this share")
    source.add_argument("--cache-only", action="store_true", help="score from the cache; never run the model")


def refuse_prompt(args: argparse.Namespace) -> None:
    """A benchmark chooses each image's prompt itself (--prompt-mode where there is a choice): --prompt would be
    recorded but not used, so it is refused."""
    if getattr(args, "prompt", None) is not None:
        choice = "--prompt-mode (class, empty or caption)" if hasattr(args, "prompt_mode") else "the empty prompt"
        raise InvalidArgumentError(f"--prompt {args.prompt!r}: this benchmark prompts each image by {choice}; "
                                   "drop --prompt.")


def source_options(args: argparse.Namespace, *, task: str,
                   baseline_overrides: Mapping[str, Mapping[str, Any]] | None = None,
                   settings_for: Any = None) -> dict[str, Any]:
    """The feature-source keywords of `ditf.eval.evaluate_*` (`features=` or `extractor=`, and the cache options)
    from --features / --model / --baseline.

    task: the task preset of --model (`ditf.registry.TASKS`). baseline_overrides: per baseline name, settings of
    that baseline for this task (e.g. DIFT's HPatches t and block). settings_for: a function args -> the
    `FeatureSettings` of --model (default: the task preset changed by the flags). With --fuse, the cache flags
    also serve DINOv2 and are allowed beside --features.
    """
    chosen = [flag for flag, value in (("--features", args.features), ("--model", args.model),
                                       ("--baseline", args.baseline)) if value is not None]
    if len(chosen) != 1:
        raise InvalidArgumentError(
            "pass exactly one of --features DIR (precomputed maps), --model ALIAS (extract with DiTFeaturizer) or "
            f"--baseline NAME (dift, dinov2-b14, dinov2-l14); got {', '.join(chosen) or 'none'}"
        )
    fuse = getattr(args, "fuse", None)
    cache = dict(cache_dir=args.cache, cache_only=args.cache_only, shard=args.shard,
                 cache_dtype=DTYPES.get(args.cache_dtype))
    if hasattr(args, "prompt_mode"):
        cache.update(prompt_mode=args.prompt_mode, captions=args.captions)
    if args.features is not None:
        cache_flags = (("--shard", args.shard), ("--cache-only", args.cache_only), ("--cache", args.cache),
                       ("--cache-dtype", args.cache_dtype))
        given = [flag for flag, value in (*cache_flags, ("--prompt-mode", getattr(args, "prompt_mode", None)),
                                          ("--variant", args.variant))
                 if value and not (fuse is not None and (flag, value) in cache_flags)]
        given += setting_flags(args)
        if given:
            raise InvalidArgumentError(
                f"{', '.join(sorted(set(given)))} describe how features are extracted, but --features reads "
                "precomputed maps; drop them, or extract with --model instead of --features."
            )
        return {"features": args.features, **(cache if fuse is not None else {})}
    quiet_loading()
    if args.baseline is not None:
        from ditf.baselines import BaselineExtractor

        given = setting_flags(args)
        if given:
            raise InvalidArgumentError(f"{', '.join(given)} set DiTF features, but --baseline {args.baseline} has its "
                                       "own published settings; drop them (or use --model).")
        from ditf.settings import torch_dtype

        device = device_of(args)
        overrides = dict((baseline_overrides or {}).get(args.baseline, {}))
        return {"extractor": BaselineExtractor(args.baseline, torch_dtype(args.dtype, device), device, **overrides),
                **cache}
    from ditf.eval.extractors import DiTFExtractor

    refuse_prompt(args)
    settings = settings_for(args) if settings_for is not None else resolve_cli_settings(args, task=task)
    extractor = DiTFExtractor(args.model, settings, task=task, device=device_of(args), offload=args.offload,
                              config=args.config, variant_files=args.weights_variant)
    return {"extractor": extractor, **cache}
