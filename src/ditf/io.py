"""Atomic file writing: a result file is either the complete new one or the old one, never half written."""

from __future__ import annotations

import glob
import json
import math
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ditf.errors import InvalidArgumentError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _writer_namespace() -> str:
    """This host's name and PID namespace (containers sharing a host name and a folder have different PID
    namespaces), made file-name safe: where a temporary file's PID means something."""
    try:
        namespace = os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
    except OSError:
        namespace = "0"
    return f"{socket.gethostname()}-{namespace}".replace(".", "-")


_HOST = _writer_namespace()


def _temporary_name(target: Path) -> Path:
    """`.<name>.<host>.<pid>.<random>.tmp` beside `target`: whose it is, so orphans can be told from live writes."""
    return target.with_name(f".{target.name}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def remove_orphans(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that killed writers of `path` left behind (written on this host by a process
    that no longer runs); return them. A live writer's file is kept."""
    target = Path(path)
    removed = []
    for candidate in target.parent.glob(f".{glob.escape(target.name)}.{_HOST}.*.tmp"):
        pid = candidate.name[len(target.name) + len(_HOST) + 3:].split(".")[0]
        if pid.isdigit() and not _running(int(pid)):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder to write to; when the block succeeds the file is moved
    onto `path` in one step (with the permissions a plain new file would get), otherwise it is deleted.
    Temporary files of earlier writers of `path` that were killed are removed first."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InvalidArgumentError(f"cannot create the folder {str(target.parent)!r} for {target.name} ({err.strerror}); "
                                   "choose an output location you can write to.") from err
    remove_orphans(target)
    temporary = _temporary_name(target)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically (synced to disk before it replaces the old file); return the path."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically; return the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], data: Any, indent: int = 2) -> Path:
    """Write JSON-able `data` to `path` atomically as strict JSON; return the path.

    JSON has no NaN or infinity: a missing value must be written as None (null). A non-finite number is refused
    with an error naming where it is in `data`, rather than written as the non-standard `NaN` token.
    """
    try:
        text = json.dumps(data, indent=indent, allow_nan=False)
    except ValueError as err:
        raise InvalidArgumentError(
            f"cannot write {str(path)!r}: the value at {_non_finite_location(data) or '?'} is not a finite number "
            "(NaN or infinity); a computation overflowed or divided by zero (in float16 activations, record in "
            "float32 or bfloat16)."
        ) from err
    except TypeError as err:
        raise InvalidArgumentError(f"cannot write {str(path)!r} as JSON: {err}.") from err
    return write_text_atomic(path, text + "\n")


def _non_finite_location(data: Any, where: str = "$") -> str | None:
    """JSON-path-like location of the first NaN or infinity in `data`, or None."""
    if isinstance(data, float) and not math.isfinite(data):
        return where
    if isinstance(data, dict):
        items = ((f"{where}.{key}", value) for key, value in data.items())
    elif isinstance(data, (list, tuple)):
        items = ((f"{where}[{index}]", value) for index, value in enumerate(data))
    else:
        return None
    return next((found for inner, value in items if (found := _non_finite_location(value, inner))), None)
