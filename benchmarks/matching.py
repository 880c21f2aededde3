"""Benchmark: exact low-resolution cosine matching vs upsample-then-match.

Run by hand (never in CI):

    .venv/bin/python benchmarks/matching.py                 # C=3072, 40x30 maps, 500x375 images
    .venv/bin/python benchmarks/matching.py --channels 768 --points 10
    .venv/bin/python benchmarks/matching.py --threads 2
    .venv/bin/python benchmarks/matching.py --device cuda --precision float32   # float32 + re-check vs float64

Each method runs in its own subprocess so that its peak resident memory (ru_maxrss; on CUDA the peak
allocated device memory) can be measured from a clean baseline; the baseline (interpreter, torch, the
two input maps) is subtracted. Prints wall and CPU time (median of --repeats runs; CPU time is less
sensitive to other load on the machine), peak extra memory, the ratios, and whether both methods
predicted the same target pixels (near-ties within 1e-5 cosine count as agreement). With
`--precision float32` the exact matcher also runs with float32 maps and a float64 re-check of
near-ties; its time is compared with the float64 path and its predictions must be identical.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from ditf.matching.correspondence import cosine_map, match_points, upsample_then_match

TIME_TARGET = 50.0
MEMORY_TARGET = 20.0


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (H, W)."""
    width, height = (int(v) for v in text.lower().split("x"))
    return height, width


def make_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded random (C, h, w) maps and (P, 2) integer source points."""
    generator = torch.Generator().manual_seed(args.seed)
    grid_h, grid_w = parse_size(args.grid)
    image_h, image_w = parse_size(args.image)
    src = torch.randn(args.channels, grid_h, grid_w, generator=generator)
    trg = torch.randn(args.channels, grid_h, grid_w, generator=generator)
    points = torch.stack(
        [torch.randint(0, image_w, (args.points,), generator=generator),
         torch.randint(0, image_h, (args.points,), generator=generator)],
        dim=1,
    )
    return src, trg, points


def peak_memory_mb(device: torch.device) -> float:
    """High-water mark in MB of this process' resident memory (Linux reports KB), or of the memory
    allocated on a CUDA device."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(args: argparse.Namespace) -> None:
    """Run one method and print a JSON line with its timings, peak memory and predictions."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    src, trg, points = (t.to(device) for t in make_inputs(args))
    size = parse_size(args.image)
    if args.worker == "reference":
        def method():
            return upsample_then_match(src, trg, points, size, size)
    else:
        def method():
            return match_points(src, trg, points, size, size, precision=args.precision)
    # torch.unravel_index imports sympy on its first call (~45 MB, once per process): not the method's memory.
    torch.unravel_index(torch.tensor([0]), (1,))
    if device.type == "cuda":
        method()  # CUDA context, cuBLAS handles and kernels are set up on the first call
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    baseline = peak_memory_mb(device)
    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        predictions = method()
        synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    print(json.dumps({
        "seconds": statistics.median(times),
        "cpu_seconds": statistics.median(cpu_times),
        "peak_extra_mb": peak_memory_mb(device) - baseline,
        "predictions": predictions.tolist(),
    }))


def run_worker(name: str, args: argparse.Namespace, precision: str = "float64") -> dict:
    command = [sys.executable, __file__, "--worker", name] + [
        f"--{key}={value}" for key, value in (
            ("channels", args.channels), ("grid", args.grid), ("image", args.image),
            ("points", args.points), ("repeats", args.repeats), ("seed", args.seed),
            ("threads", args.threads), ("device", args.device), ("precision", precision),
        )
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def disagreements(fast: list, reference: list, args: argparse.Namespace) -> int:
    """Points whose predictions differ by more than a 1e-5 near-tie in the exact cosine map."""
    differing = [i for i, (a, b) in enumerate(zip(fast, reference)) if a != b]
    if not differing:
        return 0
    src, trg, points = make_inputs(args)
    size = parse_size(args.image)
    count = 0
    for i in differing:
        cos = cosine_map(src, trg, points[i : i + 1], size, size)[0]
        (fx, fy), (rx, ry) = fast[i], reference[i]
        if abs(float(cos[fy, fx]) - float(cos[ry, rx])) > 1e-5:
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=3072)
    parser.add_argument("--grid", default="40x30", help="feature map W x h")
    parser.add_argument("--image", default="500x375", help="image W x H")
    parser.add_argument("--points", type=int, default=20, help="source keypoints per pair")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both methods (default 1: on a shared machine, several "
                             "threads make timings depend on other processes' load)")
    parser.add_argument("--device", default="cpu", help="torch device of both methods, e.g. cuda or cuda:1")
    parser.add_argument("--precision", choices=["float64", "float32"], default="float64",
                        help="float32: also run the exact matcher with float32 maps and a float64 re-check of "
                             "near-ties, and compare it with the float64 path")
    parser.add_argument("--worker", choices=["fast", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print(f"C={args.channels}, maps {args.grid}, images {args.image}, {args.points} points, "
          f"{args.threads} threads, device {args.device}, median of {args.repeats}")
    fast = run_worker("fast", args)
    reference = run_worker("reference", args)
    speedup = reference["seconds"] / fast["seconds"]
    cpu_speedup = reference["cpu_seconds"] / fast["cpu_seconds"]
    memory_ratio = reference["peak_extra_mb"] / max(fast["peak_extra_mb"], 1.0)
    rows = [("upsample-then-match (fp32)", reference), ("exact low-res (fp64)", fast)]
    for label, result in rows:
        print(f"  {label:28s} wall {result['seconds'] * 1000:9.1f} ms   cpu {result['cpu_seconds'] * 1000:9.1f} ms"
              f"   peak +{result['peak_extra_mb']:8.1f} MB")
    print(f"  time ratio   {speedup:8.1f}x wall, {cpu_speedup:.1f}x cpu  (target >= {TIME_TARGET:.0f}x)  "
          f"{'OK' if speedup >= TIME_TARGET else 'MISSED'}")
    print(f"  memory ratio {memory_ratio:8.1f}x  (target >= {MEMORY_TARGET:.0f}x)  "
          f"{'OK' if memory_ratio >= MEMORY_TARGET else 'MISSED'}")
    bad = disagreements(fast["predictions"], reference["predictions"], args)
    print(f"  predictions: {args.points - bad}/{args.points} agree (near-ties within 1e-5 count as agreement)")
    if args.precision == "float32":
        rechecked = run_worker("fast", args, precision="float32")
        print(f"  {'exact, float32 + re-check':28s} wall {rechecked['seconds'] * 1000:9.1f} ms   "
              f"cpu {rechecked['cpu_seconds'] * 1000:9.1f} ms   peak +{rechecked['peak_extra_mb']:8.1f} MB")
        identical = sum(a == b for a, b in zip(rechecked["predictions"], fast["predictions"]))
        print(f"  float64 / float32+re-check {fast['seconds'] / rechecked['seconds']:8.2f}x wall;  "
              f"predictions identical to float64: {identical}/{args.points}")


if __name__ == "__main__":
    main()
