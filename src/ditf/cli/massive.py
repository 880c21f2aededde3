"""`ditf massive scan | disrupt | guide | transport`: thin wrappers over `ditf.massive`.

Every command selects blocks with `--blocks` and denoising steps with `--steps`; `--num-inference-steps`,
`--height`, `--width` and `--guidance-scale` go to the diffusers pipeline call, and any other pipeline argument
with `--pipeline-option KEY=VALUE` (repeatable; VALUE is JSON, else a string). Everything that can be checked
without the weights (outputs, rules, operations, channels, blocks, steps, CFG branches, pipeline options) is
checked before the model loads. The interventions can be combined in Python
(`ditf.massive.generate.generate(pipe, prompt, actions=[...], transport=...)`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ditf.cli.common import HelpFormatter, check_exclusive, device_of
from ditf.cli.outputs import IMAGE_SUFFIXES, check_output_file, check_output_folder
from ditf.errors import InvalidArgumentError
from ditf.settings import DTYPES

OWN_FLAGS = {"num_inference_steps": "--num-inference-steps", "height": "--height", "width": "--width",
             "guidance_scale": "--guidance-scale", "prompt": "--prompt", "generator": "--seed", "latents": "--seed",
             "output_type": "-o"}
"""Pipeline arguments that have their own flag (or that the command sets), refused as --pipeline-option."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `massive` and its sub-commands."""
    massive = subparsers.add_parser("massive", help="massive-activation analysis and interventions",
                                    description="See, measure and steer the massive activations of a DiT.")
    commands = massive.add_subparsers(dest="massive_command", required=True)

    scan = commands.add_parser("scan", formatter_class=HelpFormatter,
                               help="record a generation (or one noised image) and report massive activations")
    scan.add_argument("--prompt", default="", help="prompt to generate (or to condition the image forward on)")
    scan.add_argument("--image", help="scan one image noised to --t instead of a generation")
    scan.add_argument("--t", type=float, help="timestep 0..1000 for --image (DiTF: 261)")
    scan.add_argument("--resolution", type=int, help="long side for --image (default: the model's preset)")
    scan.add_argument("--guidance", type=float, help="embedded guidance for --image (FLUX.1-dev, FLUX.2-dev)")
    scan.add_argument("--blocks", default="all", help="blocks to record: all, last, 5-20, 3,7")
    scan.add_argument("--steps", default="all", help="denoising steps to record: all, last, 0-3")
    scan.add_argument("--branch", default="cond", choices=["cond", "uncond"], help="CFG branch to record")
    scan.add_argument("--rule", action="append", default=None,
                      help="detection rule, repeatable: ratio[:T], sun[:ABS:REL], topk:K[:STAT] (default: ratio, sun)")
    scan.add_argument("--plot-blocks", help="blocks with full-tensor figures (default: 4 spread over --blocks)")
    scan.add_argument("--cluster-signed", action="store_true",
                      help="K-means masks on signed values (default: on magnitudes |x|, so channel signs do not matter)")
    _add_generation_args(scan)
    scan.add_argument("-o", "--output", required=True, help="output folder for the report, statistics and figures")
    scan.set_defaults(func=run_scan)

    disrupt = commands.add_parser("disrupt", formatter_class=HelpFormatter,
                                  help="generate while changing massive channels (Sun et al., Turri et al.)")
    disrupt.add_argument("--channels", default="auto",
                         help="auto, sun, top:K (detected on a clean reference pass), bottom[:K], random[:K], matched "
                              "(controls as large as auto, same calls), preset (the model's known channels), 154,1446")
    disrupt.add_argument("--op", default="zero", help="zero, mean (needs --mean-from), const:V, scale:R or clamp:V")
    disrupt.add_argument("--mean-from", action="append", metavar="SCAN",
                         help="--op mean: the per-channel means of these scans (folders or stats.json; repeatable, "
                              "merged), measured across their prompts and tokens (Sun et al.)")
    _add_scope_args(disrupt, branch="all")
    _add_generation_args(disrupt, prompt=True)
    _add_image_output(disrupt)
    disrupt.set_defaults(func=run_disrupt)

    guide = commands.add_parser("guide", formatter_class=HelpFormatter,
                                help="Detail Guidance (Gan et al. 2025): D + w (D - D_m); m, w, the window unpublished")
    guide.add_argument("--weight", type=float, required=True,
                       help="the DG scale w (the paper's w with or without CFG: ditf reads the CFG scale of the call)")
    guide.add_argument("--channels", default="auto", help="massive channels at block m: auto, preset, 154,1446, ...")
    guide.add_argument("--op", default="zero", help="the disruption of block m: zero, scale:R, ...")
    _add_scope_args(guide, branch=None, blocks_help="the block m whose massive channels are disrupted (one block)")
    _add_generation_args(guide, prompt=True)
    _add_image_output(guide)
    guide.set_defaults(func=run_guide)

    transport = commands.add_parser("transport", formatter_class=HelpFormatter,
                                    help="activation transport (Turri et al. 2026) from another prompt's trajectory")
    transport.add_argument("--source-prompt", required=True, help="prompt whose trajectory the channels come from")
    transport.add_argument("--channels", default="auto",
                           help="channels m, picked on the source's stream: auto, preset, 11,42, ... or all")
    transport.add_argument("--mask", choices=["none", "cluster"], default="none",
                           help="spatial mask p: every token, or the K-means foreground on the MA channels")
    transport.add_argument("--cluster-signed", action="store_true",
                           help="--mask cluster on signed values (default: on magnitudes |x|)")
    transport.add_argument("--source-store", metavar="FILE.safetensors",
                           help="keep the source trajectory on disk (memory-mapped) instead of in memory")
    _add_scope_args(transport, branch="all")
    _add_generation_args(transport, prompt=True)
    _add_image_output(transport)
    transport.set_defaults(func=run_transport)


def _add_scope_args(parser: argparse.ArgumentParser, *, branch: str | None,
                    blocks_help: str = "blocks to act on: all, last, 5-20, 3,7") -> None:
    group = parser.add_argument_group("where")
    group.add_argument("--blocks", required=True, help=blocks_help)
    group.add_argument("--steps", default="all", help="denoising steps to act on: all, last, 0-10, ...")
    if branch is not None:
        group.add_argument("--branch", default=branch, choices=["all", "cond", "uncond"], help="CFG branch to act on")


def _add_generation_args(parser: argparse.ArgumentParser, *, prompt: bool = False) -> None:
    group = parser.add_argument_group("model and sampling")
    if prompt:
        group.add_argument("--prompt", required=True, help="prompt to generate")
    group.add_argument("--model", required=True, help="preset alias (e.g. flux-dev), hub id or local pipeline folder")
    group.add_argument("--seed", type=int, default=0, help="generator seed")
    group.add_argument("--num-inference-steps", type=int, help="denoising steps (default: the pipeline's)")
    group.add_argument("--height", type=int, help="image height in pixels (default: the pipeline's)")
    group.add_argument("--width", type=int, help="image width in pixels (default: the pipeline's)")
    group.add_argument("--guidance-scale", type=float, help="the pipeline's guidance_scale (default: its own)")
    group.add_argument("--pipeline-option", action="append", default=[], metavar="KEY=VALUE",
                       help="any other pipeline argument, repeatable; VALUE is JSON, else a string (e.g. "
                            "use_resolution_binning=false, true_cfg_scale=4, negative_prompt=blurry)")
    group.add_argument("--dtype", choices=list(DTYPES), help="weights dtype (default: bf16 on CUDA, fp32 elsewhere)")
    group.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    group.add_argument("--offload", choices=["model", "sequential"],
                       help="keep weights on the CPU and move them to the device when used (diffusers offload)")


def _add_image_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True,
                        help="image file (.png); the record goes next to it (.json, .md)")


# ------------------------------------------------------------------------------------- checks before loading


def parse_pipeline_options(texts: list[str]) -> dict[str, Any]:
    """['use_resolution_binning=false', 'negative_prompt=blurry'] -> {'use_resolution_binning': False, ...}."""
    options: dict[str, Any] = {}
    for text in texts:
        key, equals, raw = text.partition("=")
        key = key.strip()
        if not equals or not key.isidentifier():
            raise InvalidArgumentError(f"--pipeline-option {text!r}: write KEY=VALUE, e.g. use_resolution_binning=false.")
        if key in OWN_FLAGS:
            raise InvalidArgumentError(f"--pipeline-option {text!r}: {key} has its own flag; use {OWN_FLAGS[key]}.")
        if key in options:
            raise InvalidArgumentError(f"--pipeline-option {key} is given twice; give each option once.")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def generation_plan(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline keyword arguments of the run (given settings and options), checked; the model reference too."""
    from ditf.loading import check_model
    from ditf.massive.sampling import pipeline_settings

    settings = pipeline_settings(args.num_inference_steps, args.height, args.width, args.guidance_scale)
    options = parse_pipeline_options(args.pipeline_option)
    check_model(args.model, needs=("transformer", "vae"))
    return {**settings, **options}


def check_before_loading(args: argparse.Namespace, given: dict[str, Any], **scope: Any) -> None:
    """`check_plan` on the model's outline when it is a local folder (hub models: after loading, before sampling)."""
    from ditf.massive.preflight import check_plan, outline_model

    outline = outline_model(args.model)
    if outline is not None:
        check_plan(outline, given=given, **scope)


def check_before_sampling(pipe: Any, given: dict[str, Any], **scope: Any) -> None:
    """`check_plan` on the loaded pipeline (the same checks, for models that were not local folders)."""
    from ditf.massive.preflight import check_plan, outline_pipeline

    check_plan(outline_pipeline(pipe), given=given, **scope)


def preset_channels(args: argparse.Namespace) -> tuple[int, ...]:
    """The massive channels the registry knows for --model (an alias or a hub id of a preset)."""
    from ditf.registry import PRESETS, preset_for_hub_id

    preset = PRESETS.get(args.model) or preset_for_hub_id(args.model)
    if preset is None or preset.massive is None:
        raise InvalidArgumentError(
            f"--channels preset: ditf knows no massive channels for --model {args.model!r}; pass them (e.g. "
            "--channels 154,1446) or detect them (--channels auto)."
        )
    return preset.massive.channels


def channel_spec(args: argparse.Namespace) -> Any:
    """--channels as a selector ('preset' resolved from the registry)."""
    from ditf.massive.channels import parse_channels

    if args.channels == "preset":
        return parse_channels(preset_channels(args))
    return parse_channels(args.channels)


def load_pipeline(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load the full diffusers pipeline of --model on --device (or offloaded); return (pipeline, preset)."""
    from ditf.cli.common import quiet_loading
    from ditf.features.featurizer import check_dtype_on_device
    from ditf.loading import load_components
    from ditf.settings import torch_dtype

    import torch

    device = torch.device(device_of(args))
    quiet_loading()
    dtype = torch_dtype(args.dtype, str(device))
    check_dtype_on_device(dtype, device)
    components = load_components(args.model, torch_dtype=dtype)
    pipe = components.pipeline
    if pipe is None:
        raise InvalidArgumentError(
            f"--model {args.model!r} is a bare transformer; generation and scans need the full diffusers pipeline "
            "(a folder with model_index.json, a hub id or a preset alias)."
        )
    if args.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif args.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe, components.preset


def parse_rule(text: str) -> Any:
    """'ratio[:T]' | 'sun[:ABS:REL]' | 'topk:K[:STAT]' -> a detection rule."""
    from ditf.massive.detect import RatioRule, SunRule, TopKRule
    from ditf.massive.stats import STATISTICS

    name, *values = text.split(":")
    if name == "topk" and len(values) == 2 and values[1] not in STATISTICS:
        raise InvalidArgumentError(f"--rule {text!r}: {values[1]!r} is not a statistic; use one of "
                                   f"{', '.join(STATISTICS)}.")
    try:
        if name == "ratio" and len(values) <= 1:
            return RatioRule(*(float(v) for v in values))
        if name == "sun" and len(values) in (0, 2):
            return SunRule(*(float(v) for v in values))
        if name == "topk" and len(values) in (1, 2):
            return TopKRule(int(values[0]), *values[1:])
    except ValueError as err:
        raise InvalidArgumentError(f"--rule {text!r}: the numbers after ':' are not valid.") from err
    raise InvalidArgumentError(f"--rule {text!r}; use ratio[:T], sun[:ABS:REL] or topk:K[:STAT] (e.g. topk:12).")


def _arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The command's arguments, JSON-able, for the record."""
    return {key: value for key, value in vars(args).items()
            if key != "func" and isinstance(value, (str, int, float, bool, list, type(None)))}


# ------------------------------------------------------------------------------------- commands


def run_scan(args: argparse.Namespace) -> int:
    """Write the scan report, statistics and figures to --output."""
    from ditf.features.preprocess import load_image
    from ditf.loading import check_model
    from ditf.massive.scan import DEFAULT_RULES, scan
    from ditf.massive.scopes import parse_branches

    check_output_folder(args.output, "--output")
    rules = [parse_rule(text) for text in args.rule] if args.rule else list(DEFAULT_RULES)
    parse_branches(args.branch)
    if args.image is not None:
        load_image(args.image)  # fail on a missing or corrupt file before loading a model
        if args.num_inference_steps is not None or args.steps != "all":
            raise InvalidArgumentError("--num-inference-steps and --steps apply to generation scans; an --image scan "
                                       "runs one forward.")
        if args.branch != "cond":
            raise InvalidArgumentError(f"--branch {args.branch}: an --image scan runs one conditional forward; drop "
                                       "--branch.")
        if args.pipeline_option or args.guidance_scale is not None:
            raise InvalidArgumentError("--pipeline-option and --guidance-scale apply to generation scans; an --image "
                                       "scan takes the embedded guidance as --guidance.")
        check_model(args.model, needs=("transformer", "vae"))
        options: dict[str, Any] = {}
        check_before_loading(args, {}, blocks=args.blocks)
    else:
        check_exclusive(args, "--image", t="--t", resolution="--resolution", guidance="--guidance")
        given = generation_plan(args)
        options = parse_pipeline_options(args.pipeline_option)
        check_before_loading(args, given, blocks=args.blocks, steps=args.steps, branch=args.branch)
    if args.plot_blocks is not None:
        check_before_loading(args, {}, blocks=args.plot_blocks)
    pipe, preset = load_pipeline(args)
    result = scan(pipe, prompt=args.prompt, image=args.image, t=args.t, num_inference_steps=args.num_inference_steps,
                  blocks=args.blocks, steps=args.steps, branch=args.branch, seed=args.seed, height=args.height,
                  width=args.width, resolution=args.resolution, guidance=args.guidance,
                  guidance_scale=args.guidance_scale, rules=rules, plot_blocks=args.plot_blocks, out_dir=args.output,
                  preset=preset, model=args.model, signed_clusters=args.cluster_signed, **options)
    print(f"wrote {result.files['markdown']}, {result.files['json']} and {len(result.files['figures'])} figure files")
    return 0


def run_disrupt(args: argparse.Namespace) -> int:
    """Generate while editing the chosen channels; write the image, the clean reference image and the record."""
    from ditf.massive.edits import Edit, parse_op

    means = _means(args)
    channels = channel_spec(args)
    action = Edit(parse_op(args.op, means=means), channels, blocks=args.blocks, steps=args.steps, branch=args.branch)
    return _generate(args, actions=[action], scope={"blocks": args.blocks, "steps": args.steps, "branch": args.branch,
                                                    "channels": channels})


def _means(args: argparse.Namespace) -> Any:
    """The merged statistics table of --mean-from (None without it); --mean-from needs --op mean."""
    from ditf.massive.stats import merge_stats_tables
    from ditf.massive.stats_files import load_stats_table

    if not args.mean_from:
        return None
    if args.op.strip() != "mean":
        raise InvalidArgumentError(f"--mean-from only applies to --op mean (got --op {args.op!r}); drop it or use --op mean.")
    return merge_stats_tables([load_stats_table(path) for path in args.mean_from])


def run_guide(args: argparse.Namespace) -> int:
    """Generate with Detail Guidance at block --blocks (one block m)."""
    from ditf.massive.guidance import DetailGuidance
    from ditf.indices import parse_indices

    blocks = parse_indices(args.blocks, "--blocks")
    if len(blocks) != 1:
        raise InvalidArgumentError(f"--blocks {args.blocks!r}: Detail Guidance disrupts one block m; pass one index.")
    channels = channel_spec(args)
    action = DetailGuidance(blocks[0], args.weight, steps=args.steps, channels=channels, op=args.op)
    return _generate(args, actions=[action], scope={"blocks": blocks[0], "steps": args.steps, "branch": "cond",
                                                    "channels": channels})


def run_transport(args: argparse.Namespace) -> int:
    """Generate with the MA channels of --source-prompt's trajectory transported into this one."""
    from ditf.massive.generate import TransportPlan

    if args.source_store is not None:
        check_output_file(args.source_store, "--source-store", (".safetensors",))
    channels = None if args.channels == "all" else channel_spec(args)
    plan = TransportPlan(args.source_prompt, blocks=args.blocks, steps=args.steps, channels=channels,
                         spatial="cluster" if args.mask == "cluster" else None, branch=args.branch,
                         store=args.source_store, signed=args.cluster_signed)
    return _generate(args, transport=plan, scope={"blocks": args.blocks, "steps": args.steps, "branch": args.branch,
                                                  "channels": channels})


def _generate(args: argparse.Namespace, actions: list[Any] = (), transport: Any = None,
              scope: dict[str, Any] | None = None) -> int:
    from ditf.massive.generate import generate, save_generation

    check_output_file(args.output, "--output", IMAGE_SUFFIXES)
    given = generation_plan(args)
    options = parse_pipeline_options(args.pipeline_option)
    check_before_loading(args, given, **(scope or {}))
    pipe, _ = load_pipeline(args)
    check_before_sampling(pipe, given, **(scope or {}))
    result = generate(pipe, args.prompt, actions=list(actions), transport=transport, seed=args.seed,
                      num_inference_steps=args.num_inference_steps, height=args.height, width=args.width,
                      guidance_scale=args.guidance_scale, model=args.model, **options)
    result.record["command"] = {"massive": args.massive_command, "arguments": _arguments(args)}
    paths = save_generation(result, args.output)
    print(f"wrote {paths['image']}, {paths['record']} and {paths['markdown']}")
    return 0
