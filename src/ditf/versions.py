"""Versions of ditf and of the libraries it runs on, read from the installed package metadata.

The diffusers range ditf supports is written once, in pyproject.toml; the code reads it from there.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata

from ditf.errors import UnsupportedLayoutError


def ditf_version() -> str:
    """Installed version of the ditf package ("unknown (not installed)" when run from a bare source tree)."""
    try:
        return metadata.version("ditf")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


@lru_cache(maxsize=None)
def supported_diffusers() -> str:
    """The diffusers version specifier of ditf's dependencies, e.g. ">=0.35,<0.43" (block layouts the adapters know)."""
    from packaging.requirements import Requirement

    try:
        requirements = metadata.requires("ditf") or []
    except metadata.PackageNotFoundError as err:
        raise UnsupportedLayoutError(
            "ditf is not installed, so its supported diffusers range is unknown; install it with `pip install -e .` "
            "in the repository (./run.sh does this)."
        ) from err
    for line in requirements:
        requirement = Requirement(line)
        if requirement.name == "diffusers" and requirement.marker is None:
            lower_bounds_first = sorted(requirement.specifier, key=lambda spec: (not spec.operator.startswith(">"), str(spec)))
            return ",".join(str(spec) for spec in lower_bounds_first)
    raise UnsupportedLayoutError("ditf's package metadata names no diffusers requirement; reinstall ditf.")


def diffusers_hint() -> str:
    """The sentence that tells a user how to get a diffusers version whose block layouts ditf knows."""
    return f"Install a supported diffusers version: pip install 'diffusers{supported_diffusers()}'."


def library_versions() -> dict[str, str]:
    """Versions of ditf, torch, diffusers and transformers, for results files (absent libraries are left out)."""
    versions = {"ditf": ditf_version()}
    for name in ("torch", "diffusers", "transformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
