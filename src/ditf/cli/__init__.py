"""The `ditf` command: a thin layer over the public functions.

Each command family lives in its own module with a `register(subparsers)` function that adds its
sub-commands and binds each to a `run(args) -> int` through `set_defaults(func=...)`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings

from ditf.cli.common import max_pixels_limit
from ditf.registry import preset_files
from ditf.errors import DitfError


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the `ditf` command with every sub-command registered."""
    from ditf.cli import app as app_cli
    from ditf.cli import eval as eval_cli
    from ditf.cli import features as features_cli
    from ditf.cli import massive as massive_cli
    from ditf.cli import pca as pca_cli
    from ditf.cli import smoke as smoke_cli
    from ditf.cli import sweep as sweep_cli

    from ditf.versions import ditf_version

    parser = argparse.ArgumentParser(
        prog="ditf", description="Dense features from Diffusion Transformers (DiTF) and massive-activation tools."
    )
    parser.add_argument("--version", action="version", version=f"ditf {ditf_version()}")
    parser.add_argument("--verbose", action="store_true",
                        help="also show the libraries' own warnings and loading bars (hidden by default)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    features_cli.register(subparsers)
    eval_cli.register(subparsers)
    massive_cli.register(subparsers)
    sweep_cli.register(subparsers)
    smoke_cli.register(subparsers)
    pca_cli.register(subparsers)
    app_cli.register(subparsers)
    return parser


MEMORY_FIX = ("lower the memory a run needs: fewer ensemble members per forward pass (--max-batch 1), an offloaded "
              "model (--offload model, or sequential for the least), half precision (--dtype bf16) or smaller images "
              "(--resolution)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ditf` console script; returns the process exit code.

    A user error (bad input, a missing or broken file) is one line naming the input and the fix, exit code 2;
    Ctrl-C is one line, exit code 130. Results are written atomically, so neither leaves a partial file.
    """
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings(), max_pixels_limit(args), preset_files(getattr(args, "presets", None) or []):
            quiet_third_parties(args.verbose)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("ditf: interrupted; files already complete are kept, nothing half written is left", file=sys.stderr)
        return 130
    except DitfError as err:
        print(f"ditf: error: {as_command_line(str(err))}", file=sys.stderr)
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"ditf: error: {where}{err.strerror or err}; check the path and its permissions", file=sys.stderr)
    except (MemoryError, RuntimeError) as err:  # torch.OutOfMemoryError is a RuntimeError, as is MPS's message
        if not isinstance(err, MemoryError) and not _is_out_of_memory(err):
            raise
        first_line = str(err).splitlines()[0] if str(err) else "host RAM"
        print(f"ditf: error: out of memory ({first_line}); {MEMORY_FIX}", file=sys.stderr)
    except ValueError as err:  # the libraries' own messages for unreadable files (JSON, safetensors, images)
        if not _is_file_error(err):
            raise
        print(f"ditf: error: {err}; the file is broken: replace it", file=sys.stderr)
    return 2


def _is_out_of_memory(err: RuntimeError) -> bool:
    return type(err).__name__ == "OutOfMemoryError" or "out of memory" in str(err).lower()


def _is_file_error(err: ValueError) -> bool:
    import json

    return isinstance(err, json.JSONDecodeError) or type(err).__name__ in ("SafetensorError", "UnidentifiedImageError")


_SETTING = re.compile(r"^(?P<name>[a-z_]+)=")


def as_command_line(message: str) -> str:
    """A library message in command-line words: a leading `max_batch=0 ...` becomes `--max-batch 0 ...`."""
    match = _SETTING.match(message)
    if match is None:
        return message
    return f"--{match.group('name').replace('_', '-')} {message[match.end():]}"


def quiet_third_parties(verbose: bool) -> None:
    """Silence the libraries' own warnings, notices and nested loading bars (not the user's business); `--verbose`
    keeps them. Set before the libraries are imported, which the commands do lazily."""
    os.environ["DITF_QUIET_LIBRARIES"] = "0" if verbose else "1"
    if verbose:
        return
    for library in ("transformers", "diffusers", "huggingface_hub", "accelerate", "torch", "torchvision"):
        warnings.filterwarnings("ignore", module=rf"{library}(\.|$)")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


if __name__ == "__main__":
    sys.exit(main())
