"""Placeholder: filled in by the module's owner."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands (none yet)."""
