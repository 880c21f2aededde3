#!/usr/bin/env bash
# ditf's two entry points. Both create .venv in the repo root on first use.
#   ./run.sh demo [MODEL]   features + a match figure for examples/cat1.jpg -> examples/cat2.jpg in out/.
#                           Without MODEL: a tiny RANDOM-WEIGHT smoke model built offline (runs on any CPU;
#                           its matches are meaningless). With MODEL (e.g. flux-dev): the real model, on a GPU.
#   ./run.sh test [ARGS]    the test suite (pytest ARGS)
set -euo pipefail
cd "$(dirname "$0")"

setup() {
  if [ ! -f .venv/.ditf-installed ] || [ pyproject.toml -nt .venv/.ditf-installed ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    # torch first, pinned so pip does not pull another build; override with DITF_TORCH="torch==X" for CUDA wheels.
    .venv/bin/python -m pip install -q "${DITF_TORCH:-torch==2.13.0}"
    .venv/bin/python -m pip install -q -e ".[dev]"
    touch .venv/.ditf-installed
  fi
}

demo() {
  local model="${1:-}" extra=()
  if [ -z "$model" ]; then
    echo "== No model given: using a tiny RANDOM-WEIGHT FLUX-architecture smoke model (meaningless matches)."
    .venv/bin/ditf smoke-model .cache/smoke-flux
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
