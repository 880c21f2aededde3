"""`--shard auto` under a real multi-process launcher: each rank fills its share of the cache, then
scoring reads the merged cache without running the model."""

import json
import os
import subprocess
import sys
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "spair_mini"
SETTINGS = ["--block", "20", "--t", "261", "--ensemble", "1", "--resolution", "128", "--dtype", "fp32", "--quiet"]


def test_two_ranks_split_the_images_and_scoring_merges_them(flux_pipeline_dir, tmp_path):
    cache = tmp_path / "cache"
    common = ["eval", "spair", "--root", str(FIXTURE), "--model", str(flux_pipeline_dir), "--cache", str(cache), *SETTINGS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
              "-m", "ditf.cli", *common, "--shard", "auto"]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    shards = sorted(json.loads(line)["shard"] for line in done.stdout.splitlines() if line.startswith('{"shard"'))
    assert shards == ["0/2", "1/2"]
    assert len(list(cache.rglob("*.safetensors"))) == 10

    output = tmp_path / "results.json"
    scored = subprocess.run([sys.executable, "-m", "ditf.cli", *common, "--cache-only", "--output", str(output)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert 0.0 <= json.loads(output.read_text())["all_per_point"] <= 100.0
