"""Package attributes loaded from their submodules on first use (PEP 562), so that a command that needs
little of a package does not pay for importing all of it at start-up."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_getattr(package: str, where: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: attribute `name` comes from submodule `where[name]` and is then
    kept in `namespace` (the package's globals), so each is looked up once."""
    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        value = getattr(importlib.import_module(f".{where[name]}", package), name)
        namespace[name] = value
        return value

    return __getattr__
