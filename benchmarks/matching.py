"""Benchmark: exact low-resolution cosine matching vs upsample-then-match.

Run by hand (never in CI):

    .venv/bin/python benchmarks/matching.py                 # C=3072, 40x30 maps, 500x375 images
    .venv/bin/python benchmarks/matching.py --channels 768 --points 10
    .venv/bin/python benchmarks/matching.py --threads 2
    .venv/bin/python benchmarks/matching.py --device cuda --precision float32   # float32 + re-check vs float64
    .venv/bin/python benchmarks/matching.py --end-to-end    # score a full-size synthetic split (4 min on 2 quiet cores)

Each method runs in its own subprocess so that its peak resident memory (ru_maxrss; on CUDA the peak
allocated device memory) can be measured from a clean baseline; the baseline (interpreter, torch, the
two input maps) is subtracted. Prints wall and CPU time (median of --repeats runs; CPU time is less
sensitive to other load on the machine), peak extra memory, the ratios, and whether both methods
predicted the same target pixels (near-ties within 1e-5 cosine count as agreement). With
`--precision float32` the exact matcher also runs with float32 maps and a float64 re-check of
near-ties; its time is compared with the float64 path and its predictions must be identical.

`--end-to-end` scores a synthetic SPair-sized split instead: --images images of SPair's sizes (long side
500) in 5 categories, --pairs pairs within the categories with 5-15 keypoints each and target boxes, seeded
random C-channel maps on FLUX token grids (long side 32) written as a features folder. It times
`ditf.eval.scoring.score_pairs` from the files to the PCK (the DiTF protocol) with one thread, two threads
and two worker processes, and the upsample-then-match reference (read both maps, upsample both to the image
sizes in fp32, cosine argmax, PCK) on --reference-pairs seeded pairs of the split, as the reference is slow.
Prints pairs per second, the ratio of each of ours to the reference, whether it meets the 50x target, and
whether the predictions agree on the reference's pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ditf.eval.keypoints import CorrespondenceDataset, ImageRecord, KeypointPair
from ditf.eval.metrics import PairOutcome, bbox_threshold, point_errors, summarize
from ditf.eval.protocol import protocol_for
from ditf.eval.scoring import score_pairs, torch_threads
from ditf.eval.sources import FeatureFolder
from ditf.features.io import save_features
from ditf.matching.correspondence import cosine_map, match_points, upsample_then_match

TIME_TARGET = 50.0
MEMORY_TARGET = 20.0
NEAR_TIE = 1e-5
"""Cosines closer than this at two predicted pixels are a near-tie, not a disagreement."""
CATEGORIES = ("aeroplane", "bicycle", "bird", "boat", "bottle")
LONG_SIDE = 500
"""SPair-71k images are at most 500 pixels on their long side."""
TOKENS_LONG_SIDE = 32
"""FLUX token grid of a 512-pixel long side (16 pixels a token)."""
KEYPOINTS = (5, 15)
"""Least and most keypoints of a synthetic pair."""


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


def near_tie(cos: torch.Tensor, fast: list[int], reference: list[int]) -> bool:
    """True if the cosine map `cos` (H, W) has values within NEAR_TIE at the (x, y) pixels `fast` and
    `reference`."""
    (fx, fy), (rx, ry) = fast, reference
    return abs(float(cos[fy, fx]) - float(cos[ry, rx])) <= NEAR_TIE


def disagreements(fast: list, reference: list, args: argparse.Namespace) -> int:
    """Points whose predictions differ by more than a near-tie in the exact cosine map."""
    differing = [i for i, (a, b) in enumerate(zip(fast, reference)) if a != b]
    if not differing:
        return 0
    src, trg, points = make_inputs(args)
    size = parse_size(args.image)
    return sum(not near_tie(cosine_map(src, trg, points[i : i + 1], size, size)[0], fast[i], reference[i])
               for i in differing)


# ------------------------------------------------------------------ end to end: scoring a synthetic split
def synthetic_image(category: str, index: int, rng: np.random.Generator) -> ImageRecord:
    """An image record of SPair's sizes: long side 500, short side 250-500, three in four landscape."""
    short = int(rng.integers(250, LONG_SIDE + 1))
    size = (short, LONG_SIDE) if rng.random() < 0.75 else (LONG_SIDE, short)
    return ImageRecord(Path(category) / f"{index:05d}.jpg", category, size)


def synthetic_pair(name: str, source: ImageRecord, target: ImageRecord, rng: np.random.Generator) -> KeypointPair:
    """A pair with 5-15 random keypoints (x, y) inside both images, the target box around its keypoints."""
    count = int(rng.integers(KEYPOINTS[0], KEYPOINTS[1] + 1))

    def points(image: ImageRecord) -> np.ndarray:
        height, width = image.size
        return rng.uniform(0, 1, (count, 2)) * np.array([width - 1, height - 1])

    target_points = points(target)
    box = (*target_points.min(axis=0), *target_points.max(axis=0))
    return KeypointPair(name, source.group, source, target, points(source), target_points,
                        tuple(float(v) for v in box))


def synthetic_split(images: int, pairs: int, seed: int) -> CorrespondenceDataset:
    """A seeded SPair-like test split: `images` images and `pairs` pairs, both spread over CATEGORIES."""
    rng = np.random.default_rng(seed)
    by_category = {category: [synthetic_image(category, i, rng) for i in range(images // len(CATEGORIES))]
                   for category in CATEGORIES}
    split = []
    for n in range(pairs):
        category = CATEGORIES[n % len(CATEGORIES)]
        source, target = rng.choice(len(by_category[category]), size=2, replace=False)
        src, trg = by_category[category][source], by_category[category][target]
        split.append(synthetic_pair(f"{n:05d}-{src.stem}-{trg.stem}:{category}", src, trg, rng))
    return CorrespondenceDataset("synthetic SPair-like", Path("synthetic"), "test", split, list(CATEGORIES),
                                 (0.1, 0.05, 0.01), "bbox")


def token_grid(size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) FLUX token grid of an image of `size` (H, W) resized to a 512-pixel long side."""
    height, width = size
    scale = TOKENS_LONG_SIDE / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def write_features(dataset: CorrespondenceDataset, folder: FeatureFolder, channels: int, seed: int) -> None:
    """Seeded random (C, h, w) float32 maps of every image, where `folder` reads them
    (`<root>/<category>/<stem>.safetensors`)."""
    generator = torch.Generator().manual_seed(seed)
    for image in dataset.images():
        features = torch.randn(channels, *token_grid(image.size), generator=generator)
        save_features(folder.path_for(image), features)


def time_ours(dataset: CorrespondenceDataset, folder: FeatureFolder, **where: int) -> tuple[float, dict]:
    """Wall seconds of `score_pairs` (every pair, from the files to the PCK) with `where` (threads or
    workers), and its results."""
    start = time.perf_counter()
    results = score_pairs(dataset, folder, protocol_for(dataset), progress=False, **where)
    return time.perf_counter() - start, results


def reference_pair(pair: KeypointPair, folder: FeatureFolder) -> tuple[np.ndarray, PairOutcome]:
    """The upsample-then-match reference for one pair: read both maps, upsample both to the image sizes in fp32,
    cosine argmax. Returns the (P, 2) predicted target pixels (x, y) and the outcome for the PCK."""
    src, trg = folder.load(pair.source), folder.load(pair.target)
    points = torch.from_numpy(np.floor(pair.source_points).astype(np.int64))
    predicted = upsample_then_match(src, trg, points, pair.source.size, pair.target.size).numpy()
    errors = point_errors(predicted, pair.target_points)
    return predicted, PairOutcome(pair.name, pair.category, errors, bbox_threshold(pair.target_bbox))


def time_reference(pairs: list[KeypointPair], folder: FeatureFolder,
                   threads: int) -> tuple[float, dict[str, np.ndarray], list]:
    """Wall seconds of the reference over `pairs` on `threads` torch threads, its predictions by pair name and
    its outcomes."""
    with torch_threads(threads):
        start = time.perf_counter()
        done = {pair.name: reference_pair(pair, folder) for pair in pairs}
        seconds = time.perf_counter() - start
    return seconds, {name: predicted for name, (predicted, _) in done.items()}, [o for _, o in done.values()]


def count_disagreements(pairs: list[KeypointPair], ours: dict, reference: dict[str, np.ndarray],
                        folder: FeatureFolder) -> int:
    """Keypoints where our prediction (results' `pairs`) and the reference's differ by more than a near-tie."""
    count = 0
    for pair in pairs:
        fast, slow = ours[pair.name]["pred_trg_kps"], reference[pair.name].tolist()
        differing = [i for i, (a, b) in enumerate(zip(fast, slow)) if a != b]
        if not differing:
            continue
        src, trg = folder.load(pair.source), folder.load(pair.target)
        points = torch.from_numpy(np.floor(pair.source_points[differing]).astype(np.int64))
        cos = cosine_map(src, trg, points, pair.source.size, pair.target.size)
        count += sum(not near_tie(cos[k], fast[i], slow[i]) for k, i in enumerate(differing))
    return count


def end_to_end(args: argparse.Namespace) -> None:
    """Score the synthetic split with each of ours' modes and the reference subset; print the table."""
    dataset = synthetic_split(args.images, args.pairs, args.seed)
    points = sum(pair.num_points for pair in dataset.pairs)
    print(f"end to end: {len(dataset.pairs)} pairs ({points} keypoints), {len(dataset.images())} images, "
          f"C={args.channels}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="ditf-end-to-end-") as folder:
        features = FeatureFolder(folder)
        write_features(dataset, features, args.channels, args.seed)
        rng = np.random.default_rng(args.seed + 1)
        subset = [dataset.pairs[i] for i in sorted(rng.choice(len(dataset.pairs), args.reference_pairs,
                                                              replace=False))]
        ref_seconds, ref_predictions, ref_outcomes = time_reference(subset, features, args.reference_threads)
        ref_rate = len(subset) / ref_seconds
        print(f"  {'reference: upsample-then-match (fp32)':40s} {ref_rate:8.2f} pairs/s  ({len(subset)} seeded "
              f"pairs in {ref_seconds:.1f} s, torch threads: {args.reference_threads})")
        modes = {"ours, 1 thread": {"threads": 1}, "ours, 2 threads": {"threads": 2},
                 "ours, 2 workers (1 thread each)": {"workers": 2}}
        runs = {label: time_ours(dataset, features, **where) for label, where in modes.items()}
        for label, (seconds, _) in runs.items():
            rate = len(dataset.pairs) / seconds
            print(f"  {label:40s} {rate:8.2f} pairs/s  ({len(dataset.pairs)} pairs in {seconds:.1f} s)   "
                  f"{rate / ref_rate:7.1f}x the reference (target >= {TIME_TARGET:.0f}x)  "
                  f"{'OK' if rate / ref_rate >= TIME_TARGET else 'MISSED'}")
        results = [found for _, found in runs.values()]
        print(f"  our modes give identical results: {all(found == results[0] for found in results)}")
        bad = count_disagreements(subset, results[0]["pairs"], ref_predictions, features)
        subset_points = sum(pair.num_points for pair in subset)
        ours_correct = sum(results[0]["pairs"][pair.name]["correct"] for pair in subset)
        ref_correct = summarize(ref_outcomes, dataset.categories, 0.1, "<=")["all_per_point"] * subset_points / 100
        print(f"  predictions on the reference's pairs: {subset_points - bad}/{subset_points} agree (near-ties "
              f"within {NEAR_TIE:g} count as agreement); PCK@0.1 keypoints correct: ours {ours_correct}, "
              f"reference {round(ref_correct)}")
    print(f"  load average at the end {os.getloadavg()[0]:.1f}")


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
    parser.add_argument("--end-to-end", action="store_true",
                        help="score a synthetic SPair-sized split end to end instead (see the docstring)")
    parser.add_argument("--images", type=int, default=120, help="--end-to-end: images of the split")
    parser.add_argument("--pairs", type=int, default=1000, help="--end-to-end: pairs of the split")
    parser.add_argument("--reference-pairs", type=int, default=30,
                        help="--end-to-end: seeded pairs of the split the reference scores")
    parser.add_argument("--reference-threads", type=int, default=os.cpu_count(),
                        help="--end-to-end: torch threads of the reference (default: every core, its best case "
                             "for its large products)")
    parser.add_argument("--worker", choices=["fast", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.end_to_end:
        end_to_end(args)
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
