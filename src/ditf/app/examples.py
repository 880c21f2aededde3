"""The example images the page offers (a cat to match into another cat), shipped as package data.

They are `examples/cat1.jpg` and `cat2.jpg` of the repository, installed with the package under
`ditf/assets/`, so `ditf app` offers them from a wheel as well as from a checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

EXAMPLE_NAMES = ("cat1.jpg", "cat2.jpg")
"""(source, target) file names in `ditf/assets/`."""


def bundled_examples() -> tuple[Path, Path] | None:
    """(source, target) paths of the bundled example images, or None when the install lacks them. Resolved (a
    checkout's assets are links to `examples/`), so the page can allow exactly their folder."""
    assets = resources.files("ditf") / "assets"
    pair = tuple(Path(str(assets / name)).resolve() for name in EXAMPLE_NAMES)
    return (pair[0], pair[1]) if all(path.is_file() for path in pair) else None
