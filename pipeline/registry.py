"""Registries of swappable parts (backbones, CAM methods, refiners), picked by a name in params.

A name resolves, in order, to: a built-in registered with ``@REG.register("name")``; a plugin
advertised by an installed package under the entry-point group ``wsss.plugins`` with the name
``<kind>.<name>`` (e.g. ``cam_method.scorecam = mypkg.cams:ScoreCAM``); or a dotted path
``package.module:Object`` / ``package.module.Object`` given directly in params.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Callable

ENTRY_POINT_GROUP = "wsss.plugins"


class RegistryError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def load_dotted(path: str) -> Any:
    """Import ``pkg.mod:obj`` or ``pkg.mod.obj``."""
    mod_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not mod_name or not attr:
        raise RegistryError(f"{path!r} is not a dotted path like 'package.module:Object'")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise RegistryError(f"cannot import module {mod_name!r} for {path!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RegistryError(f"module {mod_name!r} has no attribute {attr!r} (from {path!r})") from None


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj):
            if name in self._items:
                raise RegistryError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def plugins(self) -> dict[str, Any]:
        """Entry points named ``<kind>.<name>`` in group ``wsss.plugins`` (not yet loaded)."""
        prefix = self.kind + "."
        return {ep.name[len(prefix):]: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name.startswith(prefix)}

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self.plugins()))

    def get(self, name: str) -> Any:
        if name in self._items:
            return self._items[name]
        eps = self.plugins()
        if name in eps:
            return eps[name].load()
        if "." in name or ":" in name:
            return load_dotted(name)
        raise RegistryError(f"unknown {self.kind} {name!r}; known: {self.names()} "
                            f"(or a plugin in entry-point group {ENTRY_POINT_GROUP!r}, or a dotted path 'pkg.mod:Obj')")


BACKBONES = Registry("backbone")
CAM_METHODS = Registry("cam_method")
REFINERS = Registry("refiner")
