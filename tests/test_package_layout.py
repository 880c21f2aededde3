"""The package imports in one direction, and starting it costs little: what a notebook or `ditf --help` pays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
HEAVY = ("torch", "diffusers", "transformers", "matplotlib", "scipy")


def imported_after(code: str) -> list[str]:
    """The heavy libraries that running `code` in a fresh interpreter imports."""
    probe = f"import sys\n{code}\nimport json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_layer_contracts_hold():
    """pyproject.toml's import-linter contracts: errors/io -> registry -> settings -> arch -> loading -> features ->
    matching | viz -> baselines -> eval | massive -> app -> cli, and no import cycle inside any package."""
    from importlinter.cli import lint_imports

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert lint_imports(no_cache=True, no_logo=True) == 0
    finally:
        os.chdir(cwd)


def test_import_ditf_loads_no_heavy_library():
    assert imported_after("import ditf, ditf.eval, ditf.massive, ditf.app, ditf.viz; ditf.__version__; ditf.PRESETS; "
                          "ditf.FeatureSettings") == []


@pytest.mark.parametrize("command", [[], ["features"], ["match"], ["eval"], ["eval", "spair"], ["eval", "davis"],
                                     ["eval", "davis-score"], ["eval", "hpatches"], ["eval", "ade20k"],
                                     ["eval", "seg-score"], ["massive", "scan"], ["massive", "disrupt"],
                                     ["massive", "guide"], ["massive", "transport"], ["smoke-model"], ["pca"],
                                     ["app"], ["sweep", "spair"], ["presets"]])
def test_help_imports_neither_torch_nor_diffusers(command):
    code = f"from ditf.cli import main\ntry:\n    main({command + ['--help']!r})\nexcept SystemExit:\n    pass"
    assert imported_after(code) == []


def test_python_dash_m_ditf_runs_the_command():
    done = subprocess.run([sys.executable, "-m", "ditf", "--version"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert done.returncode == 0 and done.stdout.startswith("ditf ")
