"""Named tensors kept in memory, or streamed to a safetensors file on disk and read back memory-mapped.

On disk, every tensor is appended to a temporary data file as it arrives (memory: one tensor at a time); `close`
writes the safetensors file (header, then the data copied in blocks) atomically and maps it, so reading a tensor
loads that tensor only. The file is a plain safetensors file: `safetensors.safe_open` reads it, and its
`__metadata__` holds the caller's JSON-able index.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

from ditf.errors import InvalidArgumentError
from ditf.io import atomic_path

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
METADATA_KEY = "ditf"
"""Key of the caller's JSON index in the file's `__metadata__`."""


class TensorStore:
    """Tensors by name: in memory (`path=None`), or in the safetensors file `path` once `close` is called."""

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = None if path is None else Path(path)
        self.nbytes = 0
        self.metadata: dict[str, Any] = {}
        self._memory: dict[str, torch.Tensor] = {}
        self._header: dict[str, Any] = {}
        self._data_file: Any = None
        self._data_path: Path | None = None
        self._reader: Any = None
        if self.path is not None:
            if self.path.suffix != ".safetensors":
                raise InvalidArgumentError(f"store={str(self.path)!r}: name the file *.safetensors.")
            self._data_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.{id(self):x}.data")

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> TensorStore:
        """Map an existing file written by a `TensorStore` (or any safetensors file) for reading."""
        from safetensors import safe_open

        store = cls()
        store.path = Path(path)
        if not store.path.is_file():
            raise InvalidArgumentError(f"tensor file {str(store.path)!r} does not exist; pass a .safetensors file.")
        store._reader = safe_open(str(store.path), framework="pt", device="cpu")
        raw = (store._reader.metadata() or {}).get(METADATA_KEY)
        store.metadata = json.loads(raw) if raw else {}
        store.nbytes = store.path.stat().st_size
        return store

    @property
    def on_disk(self) -> bool:
        """True when the tensors live in a file."""
        return self.path is not None

    def names(self) -> list[str]:
        """Names of the stored tensors."""
        if self._reader is not None:
            return list(self._reader.keys())
        return list(self._memory) if self.path is None else list(self._header)

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Store a CPU copy of `tensor` under `name` (appended to the data file when on disk)."""
        if self._reader is not None:
            raise InvalidArgumentError(f"the tensor file {self.path} is closed; record into a new store.")
        if name in self._memory or name in self._header:
            raise InvalidArgumentError(f"tensor {name!r} is stored already; every name is written once.")
        value = tensor.detach().to("cpu").contiguous()
        self.nbytes += value.numel() * value.element_size()
        if self.path is None:
            self._memory[name] = value.clone() if value.data_ptr() == tensor.data_ptr() else value
            return
        if value.dtype not in _DTYPES:
            raise InvalidArgumentError(f"tensor {name!r} has dtype {value.dtype}, which safetensors cannot hold.")
        data = value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b""
        if self._data_file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._data_file = open(self._data_path, "wb")
        start = self._data_file.tell()
        self._data_file.write(data)
        self._header[name] = {"dtype": _DTYPES[value.dtype], "shape": list(value.shape),
                              "data_offsets": [start, start + len(data)]}

    def get(self, name: str) -> torch.Tensor:
        """The tensor stored under `name` (read from the mapped file when on disk)."""
        if self._reader is not None:
            if name not in self._reader.keys():
                raise InvalidArgumentError(f"{self.path} holds no tensor {name!r}.")
            return self._reader.get_tensor(name)
        if self.path is not None:
            raise InvalidArgumentError(f"the tensor file {self.path} is still being written; close() it first.")
        return self._memory[name]

    def close(self, metadata: dict[str, Any] | None = None) -> None:
        """Finish writing: on disk, write the safetensors file (with `metadata` as its JSON index) and map it."""
        self.metadata = dict(metadata or {})
        if self.path is None or self._reader is not None:
            return
        if self._data_file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._data_file = open(self._data_path, "wb")
        self._data_file.close()
        header = dict(self._header)
        header["__metadata__"] = {METADATA_KEY: json.dumps(self.metadata, allow_nan=False)}
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        try:
            with atomic_path(self.path) as temporary:
                with open(temporary, "wb") as out, open(self._data_path, "rb") as data:
                    out.write(struct.pack("<Q", len(encoded)))
                    out.write(encoded)
                    shutil.copyfileobj(data, out, length=16 << 20)
                    out.flush()
                    os.fsync(out.fileno())
        finally:
            self._data_path.unlink(missing_ok=True)
        opened = TensorStore.open(self.path)
        self._reader, self.nbytes = opened._reader, opened.nbytes

    def discard(self) -> None:
        """Drop a store that will not be closed (its temporary data file is deleted)."""
        if self._data_file is not None and not self._data_file.closed:
            self._data_file.close()
        if self._data_path is not None:
            self._data_path.unlink(missing_ok=True)


def format_bytes(count: float) -> str:
    """1234567 -> '1.2 MB' (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


__all__ = ["METADATA_KEY", "TensorStore", "format_bytes"]
