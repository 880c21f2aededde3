#!/usr/bin/env bash
# ditf's two entry points. Both create .venv in the repo root on first use.
#   ./run.sh demo [MODEL]   features + a match figure for examples/cat1.jpg -> examples/cat2.jpg in out/.
#                           Without MODEL: a tiny RANDOM-WEIGHT smoke model built offline (runs on any CPU;
#                           its matches are meaningless). With MODEL (e.g. flux-dev): the real model, on a GPU.
#   ./run.sh test [ARGS]    the test suite (pytest ARGS)
set -euo pipefail
cd "$(dirname "$0")"

setup() {
  # Reinstall when pyproject.toml changed or another torch is asked for (the stamp records the DITF_TORCH used).
  local torch_spec="${DITF_TORCH:-torch==2.13.0}"
  if [ ! -f .venv/.ditf-installed ] || [ pyproject.toml -nt .venv/.ditf-installed ] \
     || [ "$(cat .venv/.ditf-installed)" != "$torch_spec" ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    # torch first, pinned so pip does not pull another build; DITF_TORCH="torch==X" (or "torch") for CUDA wheels.
    # Another torch than the one installed is asked for: remove it, or pip would call the request satisfied.
    if [ -f .venv/.ditf-installed ] && [ "$(cat .venv/.ditf-installed)" != "$torch_spec" ]; then
      .venv/bin/python -m pip uninstall -q -y torch
    fi
    .venv/bin/python -m pip install -q "$torch_spec"
    .venv/bin/python -m pip install -q -e ".[dev,app]"  # app: gradio, for ditf app
    echo "$torch_spec" > .venv/.ditf-installed
  fi
}

demo() {
  local model="${1:-}" extra=()
  if [ -z "$model" ]; then
    echo "== No model given: using a tiny RANDOM-WEIGHT FLUX-architecture smoke model (meaningless matches)."
    .venv/bin/ditf smoke-model -o .cache/smoke-flux
    model=.cache/smoke-flux
    extra=(--block 28 --t 261 --ensemble 2 --resolution 256 --dtype fp32)
  fi
  .venv/bin/ditf features examples/cat1.jpg examples/cat2.jpg --model "$model" -o out/features "${extra[@]}"
  .venv/bin/ditf match examples/cat1.jpg examples/cat2.jpg --model "$model" \
    --points "186,185;274,185;230,225;164,35;296,35" -o out/match.png "${extra[@]}"
  echo "== wrote out/features/*.safetensors and out/match.png"
}

case "${1:-}" in
  demo) setup; shift; demo "$@" ;;
  test) setup; shift; HF_HUB_OFFLINE=1 .venv/bin/python -m pytest "$@" ;;
  *) echo "usage: ./run.sh demo [MODEL] | ./run.sh test [pytest args]" >&2; exit 2 ;;
esac
