"""Lazy package attributes (PEP 562): a package names what it exports and where, and each name is imported on
first use, so `import ditf` and its subpackages stay cheap until torch, diffusers or matplotlib is needed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str], *, submodules: bool = False
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package`.

    exports: attribute name -> module that defines it. submodules: also give `package.<name>` for any submodule
    that is not an export. A resolved name is stored in the package, so the next lookup is a plain attribute.
    """
    namespace = import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(import_module(exports[name]), name)
            namespace[name] = value
            return value
        if submodules and not name.startswith("__"):
            try:
                return import_module(f"{package}.{name}")
            except ModuleNotFoundError as err:
                if err.name != f"{package}.{name}":
                    raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*exports, *namespace.get("__all__", ())})

    return __getattr__, __dir__
