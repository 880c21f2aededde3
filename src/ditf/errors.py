"""Errors that teach: each names the argument, the value it got, what is valid and how to fix it."""

from __future__ import annotations


class DitfError(Exception):
    """Base class of every error ditf raises on bad input or an unsupported setup."""


class UnknownModelError(DitfError):
    """A model alias, hub id or path that ditf cannot resolve to a supported DiT."""


class UnsupportedLayoutError(DitfError):
    """A diffusers module whose structure or forward signature ditf does not know."""


class InvalidArgumentError(DitfError, ValueError):
    """An argument outside its valid range (block index, timestep, channel, ...)."""


class ImageError(DitfError):
    """An image file that is missing, corrupt or too small."""


class DatasetError(DitfError):
    """A dataset tree or annotation that is missing files or is malformed."""
