"""Checks of output paths before any work: a file where a file is wanted, a folder where a folder is, writable.

`-o/--output` names a folder for commands that write many files and a file for those that write one.
"""

from __future__ import annotations

import os
from pathlib import Path

from ditf.errors import InvalidArgumentError

FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".tif", ".tiff", ".webp")
"""Figure formats matplotlib writes without extra packages."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
"""Image formats for generated pictures (PIL)."""


def check_output_file(path: str | os.PathLike[str], flag: str, suffixes: tuple[str, ...] | None = None) -> Path:
    """`path` as a file to write: not an existing folder, with one of `suffixes` (when given), in a folder that
    exists or can be created and is writable."""
    target = Path(path)
    if target.is_dir():
        raise InvalidArgumentError(f"{flag} {str(path)!r} is a folder; pass a file path such as "
                                   f"{str(target / ('result' + (suffixes[0] if suffixes else '.json')))!r}.")
    if suffixes is not None and target.suffix.lower() not in suffixes:
        raise InvalidArgumentError(f"{flag} {str(path)!r}: the suffix {target.suffix or '(none)'!r} is not one of "
                                   f"{', '.join(suffixes)}; name the file e.g. {target.stem}{suffixes[0]}.")
    _check_writable(target.parent, flag, path)
    return target


def check_output_folder(path: str | os.PathLike[str], flag: str) -> Path:
    """`path` as a folder to write into: not an existing file, and writable (or creatable)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InvalidArgumentError(f"{flag} {str(path)!r} is a file, but this command writes a folder of files; "
                                   "pass a folder path.")
    _check_writable(folder, flag, path)
    return folder


def _check_writable(folder: Path, flag: str, given: str | os.PathLike[str]) -> None:
    """The nearest existing ancestor of `folder` must be a writable folder (so `folder` can be made or written)."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidArgumentError(f"{flag} {str(given)!r}: {existing} is a file, so nothing can be written below it.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"{flag} {str(given)!r}: the folder {existing} is not writable; choose another "
                                   "output location or fix its permissions.")
