"""Benchmark: what recording massive activations costs during a 28-step FLUX generation.

Run by hand (never in CI); about 10 minutes on a 2-core CPU with the defaults:

    .venv/bin/python benchmarks/massive.py
    .venv/bin/python benchmarks/massive.py --resolution 512 --repeats 2

The model is a random-weight FLUX.1 transformer of the real width (3072 channels, 24 heads, T5 width 4096,
guidance embedding) with a reduced depth (default 1 double + 4 single blocks), written in bf16 as a pipeline
folder with a small VAE and no text encoders (every mode gets the same random `prompt_embeds`). Each mode loads it
in a fresh subprocess and runs the pipeline once, 28 steps, recording every block and step of the `cond` branch:

- plain:       the pipeline alone (no session);
- statistics:  what `ditf massive scan` keeps for every block and step: per-channel statistics of the image
               stream and the AdaLN vectors (`Record(points=("image", "shift", "scale", "gate"))`), then written
               with `save_stats_table` (JSON index + binary vectors);
- full:        whole image-stream tensors of every block and step, in memory (`Record(full=True, stats=False)`);
- source:      a transport source on FLUX.1-dev's two massive channels 154 and 1446 (`SourceRecord`), in memory;
- source-disk: a transport source of every channel streamed to a safetensors file (`SourceRecord(channels=None,
               store=...)`), to show that disk storage keeps memory flat.

Each mode reports the wall and CPU time of the pipeline call, the peak resident memory of the process (VmHWM,
weights included) and above its level after loading, and the bytes the recording keeps (in memory or on disk).
Targets: statistics within 1.2x the plain pipeline's peak memory and 1.3x its time.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FLUX_WIDTH = dict(attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                  in_channels=64, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
"""FLUX.1-dev's transformer config apart from its depth (19 double + 38 single blocks)."""
FLUX_DEV = {"blocks": 57, "steps": 28, "tokens": 4096}
"""FLUX.1-dev at 1024 px in bf16: the scale the sizes are extrapolated to."""
MODES = ("plain", "statistics", "full", "source", "source-disk")
TARGETS = {"memory": 1.2, "time": 1.3}
MASSIVE = (154, 1446)


# ------------------------------------------------------------------ the checkpoint
def write_pipeline(folder: Path, double: int, single: int, seed: int) -> int:
    """A FLUX pipeline folder (random bf16 transformer, small VAE, scheduler, no text encoders); returns parameters."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from safetensors.torch import save_file

    with init_empty_weights():
        transformer = FluxTransformer2DModel(num_layers=double, num_single_layers=single, **FLUX_WIDTH)
    generator = torch.Generator().manual_seed(seed)
    state, params = {}, 0
    for name, meta in transformer.state_dict().items():
        params += meta.numel()
        if meta.ndim >= 2:  # N(0, 1/fan_in) keeps activations in range through the blocks
            state[name] = (torch.randn(meta.shape, generator=generator) * meta.shape[1] ** -0.5).to(torch.bfloat16)
        elif name.endswith("bias"):
            state[name] = (torch.randn(meta.shape, generator=generator) * 0.02).to(torch.bfloat16)
        else:
            state[name] = torch.ones(meta.shape, dtype=torch.bfloat16)
    (folder / "transformer").mkdir(parents=True)
    transformer.save_config(folder / "transformer")
    save_file(state, folder / "transformer" / "diffusion_pytorch_model.safetensors")
    del state
    torch.manual_seed(seed)
    vae = AutoencoderKL(latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64),
                        layers_per_block=1, norm_num_groups=32, shift_factor=0.1159, scaling_factor=0.3611)
    vae.to(torch.bfloat16).save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).save_pretrained(folder / "scheduler")
    none = [None, None]
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": none, "text_encoder_2": none, "tokenizer": none, "tokenizer_2": none,
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    return params


# ------------------------------------------------------------------ one mode in a fresh process
def peak_rss_mb() -> float:
    """High-water mark of this process' resident memory in MB (VmHWM: not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def actions_for(mode: str, folder: Path) -> list:
    from ditf.massive import Record
    from ditf.massive.sources import SourceRecord

    if mode == "statistics":
        return [Record(points=("image", "shift", "scale", "gate"), blocks="all", steps="all")]
    if mode == "full":
        return [Record(points=("image",), blocks="all", steps="all", full=True, stats=False, warn_bytes=math.inf)]
    if mode == "source":
        return [SourceRecord(MASSIVE, blocks="all", branch="cond")]
    if mode == "source-disk":
        return [SourceRecord(None, blocks="all", branch="cond", store=folder / "source.safetensors",
                             warn_bytes=math.inf)]
    return []


def kept_bytes(mode: str, actions: list, folder: Path) -> tuple[int, str]:
    """(bytes the recording keeps, where) after the run; statistics are written to disk (part of the measured run)."""
    from ditf.massive.stats_files import arrays_path, save_stats_table

    if mode == "statistics":
        path = save_stats_table(actions[0].recording.table(), folder / "stats.json")
        return path.stat().st_size + arrays_path(path).stat().st_size, "disk"
    if mode == "full":
        return sum(t.numel() * t.element_size() for t in actions[0].recording.tensors.values()), "memory"
    if mode in ("source", "source-disk"):
        return actions[0].source.nbytes, "disk" if mode == "source-disk" else "memory"
    return 0, "-"


def worker(args: argparse.Namespace) -> None:
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    from ditf.building import diffusers_dtype
    from ditf.massive import intervene

    torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    inputs = load_file(folder / "inputs.safetensors")
    before_load = peak_rss_mb()
    absent = dict.fromkeys(("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
    pipe = FluxPipeline.from_pretrained(folder, **diffusers_dtype(torch.bfloat16), **absent)
    pipe.set_progress_bar_config(disable=True)
    loaded = peak_rss_mb()
    actions = actions_for(args.worker, folder)
    call = dict(prompt_embeds=inputs["prompt_embeds"].to(torch.bfloat16),
                pooled_prompt_embeds=inputs["pooled_prompt_embeds"].to(torch.bfloat16), num_inference_steps=28,
                height=args.resolution, width=args.resolution, guidance_scale=3.5, output_type="latent",
                generator=torch.Generator().manual_seed(args.seed))
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        if args.worker == "plain":
            latents = pipe(**call).images
        else:
            with intervene(pipe, actions):
                latents = pipe(**call).images
    kept, where = kept_bytes(args.worker, actions, folder)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = peak_rss_mb()
    result = {"wall_s": wall, "cpu_s": cpu, "peak_mb": peak, "above_load_mb": peak - loaded,
              "load_mb": loaded - before_load, "kept_bytes": kept, "where": where,
              "latents_checksum": float(latents.float().abs().sum())}
    if args.worker == "statistics":  # after the measurement: the first format (all-JSON, indent 2), for comparison
        result["json_text_bytes"] = len(json.dumps(actions[0].recording.table().to_dict(), indent=2).encode())
    print(json.dumps(result))


# ------------------------------------------------------------------ driver
def run_worker(mode: str, folder: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--folder", str(folder), "--resolution",
               str(args.resolution), "--threads", str(args.threads), "--seed", str(args.seed)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"worker {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of(runs: list[dict]) -> dict:
    """Per numeric quantity, the smallest value over repeated runs of one mode (time and memory only go up with
    background load)."""
    return {key: (min(run[key] for run in runs) if isinstance(runs[0][key], (int, float)) else runs[0][key])
            for key in runs[0]}


def megabytes(count: float) -> str:
    return f"{count / 1e6:,.1f}"


def report(results: dict[str, dict], args: argparse.Namespace, params: int) -> None:
    tokens = (args.resolution // 16) ** 2
    blocks = args.double + args.single
    print(f"\nFLUX width 3072, {args.double} double + {args.single} single blocks ({params / 1e9:.2f}B parameters, "
          f"bf16), {args.resolution} px ({tokens} image + {args.text_tokens} text tokens), 28 steps, guidance 3.5 "
          f"(no CFG), {args.threads} threads; best of {args.repeats} run(s); every block and step of `cond`.\n")
    print("| mode | wall s | CPU s | peak MB | above load MB | kept MB | where |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for mode in [mode for mode in MODES if mode in results]:
        r = results[mode]
        print(f"| {mode} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_mb']:,.0f} | {r['above_load_mb']:,.0f} | "
              f"{megabytes(r['kept_bytes'])} | {r['where']} |")
    same = {round(r["latents_checksum"], 3) for r in results.values()}
    print(f"\nEvery mode produced the same latents: {'yes' if len(same) == 1 else 'NO ' + str(same)}.")
    if not {"plain", "statistics"} <= set(results):
        return
    plain, stats = results["plain"], results["statistics"]
    checks = [("statistics / plain, peak memory", stats["peak_mb"] / plain["peak_mb"], TARGETS["memory"]),
              ("statistics / plain, wall time", stats["wall_s"] / plain["wall_s"], TARGETS["time"]),
              ("statistics / plain, CPU time", stats["cpu_s"] / plain["cpu_s"], TARGETS["time"])]
    print("\n| ratio | value | target | met |\n|---|---:|---:|:-:|")
    for name, value, target in checks:
        print(f"| {name} | {value:.2f} | <= {target} | {'yes' if value <= target else 'NO'} |")
    if not {"full", "source", "statistics"} <= set(results):
        return
    cells = blocks * 28
    dev_cells = FLUX_DEV["blocks"] * FLUX_DEV["steps"]
    full_per_cell = results["full"]["kept_bytes"] / cells * (FLUX_DEV["tokens"] / tokens)  # bf16 here and there
    source_per_cell = results["source"]["kept_bytes"] / cells * (FLUX_DEV["tokens"] / tokens)
    stats_per_cell = results["statistics"]["kept_bytes"] / cells
    print(f"\nStatistics on disk: {megabytes(results['statistics']['kept_bytes'])} MB (JSON index + safetensors "
          f"vectors) against {megabytes(results['statistics']['json_text_bytes'])} MB as all-JSON text.")
    print(f"\nExtrapolated to FLUX.1-dev at 1024 px ({FLUX_DEV['blocks']} blocks x 28 steps, {FLUX_DEV['tokens']} image "
          f"tokens, bf16): whole tensors {full_per_cell * dev_cells / 1e9:.1f} GB, a two-channel transport source "
          f"{source_per_cell * dev_cells / 1e6:.1f} MB, statistics {stats_per_cell * dev_cells / 1e6:.0f} MB on disk.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks of the reduced model")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks of the reduced model")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (multiple of 16)")
    parser.add_argument("--text-tokens", type=int, default=64, help="T5 tokens of the random prompt embedding")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated modes to run (plain and statistics are needed for the targets)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="write the checkpoint here and keep it (default: a temp folder)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="ditf-bench-massive-") as tmp:
        folder = (args.keep or Path(tmp)) / "flux_reduced"
        start = time.perf_counter()
        if not (folder / "params.json").is_file():
            params = write_pipeline(folder, args.double, args.single, args.seed)
            (folder / "params.json").write_text(json.dumps({"params": params}))
        params = json.loads((folder / "params.json").read_text())["params"]
        from safetensors.torch import save_file

        generator = torch.Generator().manual_seed(args.seed)
        save_file({"prompt_embeds": torch.randn(1, args.text_tokens, 4096, generator=generator),
                   "pooled_prompt_embeds": torch.randn(1, 768, generator=generator)}, folder / "inputs.safetensors")
        print(f"checkpoint ready in {time.perf_counter() - start:.0f} s: {folder}", flush=True)
        modes = [mode for mode in MODES if mode in args.modes.split(",")]
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for repeat in range(args.repeats):
            for mode in modes:
                runs[mode].append(run_worker(mode, folder, args))
                shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in runs[mode][-1].items()}
                print(f"  run {repeat + 1} {mode}: {json.dumps(shown)}", flush=True)
        results = {mode: best_of(r) for mode, r in runs.items()}
        report(results, args, params)
        print(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


if __name__ == "__main__":
    main()
