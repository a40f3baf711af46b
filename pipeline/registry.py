"""Registries of swappable parts (backbones, CAM methods, CAM training objectives, refiners, datasets), picked by a name in params.

A name resolves, in order, to: a built-in registered with ``@REG.register("name")``; a plugin
advertised by an installed package under the entry-point group ``wsss.plugins`` with the name
``<kind>.<name>`` (e.g. ``cam_method.scorecam = mypkg.cams:ScoreCAM``); or a dotted path
``package.module:Object`` / ``package.module.Object`` given directly in params.

A part's own settings come from an options param (``cam.method_options``, ``crf.mode_options``):
keyword args of its constructor, checked by :func:`check_options`.
"""
from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from typing import Any, Callable

ENTRY_POINT_GROUP = "wsss.plugins"


class RegistryError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class OptionsError(TypeError):
    """An options param holds a key the part's constructor does not take (the message names both)."""


def check_options(factory: Callable[..., Any], options: dict, param: str, what: str, positional: int = 1) -> None:
    """Raise OptionsError naming ``param`` and the key unless ``factory(<positional args>, **options)``
    would bind: ``positional`` leading args are the pipeline's (a CAM method's model, a refiner's ``crf``
    params), every other named parameter is an option. ``what`` names the part in the message."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to read (a C callable): the call itself will tell
        return
    params = list(sig.parameters.values())
    takes = [p.name for p in params[positional:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        for key in options:
            if key not in takes:
                raise OptionsError(f"param {param}: {what} has no option {key!r}; "
                                   f"{'it takes ' + ', '.join(map(repr, takes)) if takes else 'it takes no options'}")
    try:
        sig.bind(*[None] * positional, **options)
    except TypeError as e:
        raise OptionsError(f"param {param}: {what} cannot take options {options}: {e}") from None


def load_dotted(path: str) -> Any:
    """Import ``pkg.mod:obj`` or ``pkg.mod.obj``."""
    mod_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not mod_name or not attr:
        raise RegistryError(f"{path!r} is not a dotted path like 'package.module:Object'")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise RegistryError(f"cannot import module {mod_name!r} for {path!r}: {e}") from e
    except Exception as e:  # the module's own code raised while it was imported
        raise RegistryError(f"module {mod_name!r} for {path!r} raised {type(e).__name__} while imported: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RegistryError(f"module {mod_name!r} has no attribute {attr!r} (from {path!r})") from None


class Registry:
    """``kind`` names the registry in messages; ``param`` (e.g. ``cam.method``) is the param the names
    come from, so a failure to resolve or load one names it."""

    def __init__(self, kind: str, param: str | None = None):
        self.kind = kind
        self.param = param
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

    def get(self, name: str, param: str | None = None) -> Any:
        """The object registered, advertised or importable as ``name``. Every failure (unknown name, a
        plugin that cannot be imported or raises while it is imported) is a RegistryError naming the
        param (``param`` or the registry's) and the plugin, with the original exception chained."""
        if name in self._items:
            return self._items[name]
        where = f"param {param or self.param}: " if (param or self.param) else ""
        eps = self.plugins()
        if name in eps:
            ep = eps[name]
            return self._load(lambda: ep.load(), f"{where}{self.kind} plugin {name!r} (entry point {ep.value!r} "
                                                 f"in group {ENTRY_POINT_GROUP!r})")
        if "." in name or ":" in name:
            return self._load(lambda: load_dotted(name), f"{where}{self.kind} plugin {name!r}")
        raise RegistryError(f"{where}unknown {self.kind} {name!r}; known: {self.names()} "
                            f"(or a plugin in entry-point group {ENTRY_POINT_GROUP!r}, or a dotted path 'pkg.mod:Obj')")

    @staticmethod
    def _load(load: Callable[[], Any], what: str) -> Any:
        try:
            return load()
        except RegistryError as e:
            raise RegistryError(f"{what}: {e}") from (e.__cause__ or e)
        except Exception as e:  # a plugin's own code runs at import: any error is its failure to load
            raise RegistryError(f"{what} failed to load: {type(e).__name__}: {e}") from e


BACKBONES = Registry("backbone")  # cam.backbone and seg.backbone both name one
CAM_METHODS = Registry("cam_method", param="cam.method")
CAM_TRAINING = Registry("cam_training", param="cam.training")  # objectives (pipeline.cam.objectives)
REFINERS = Registry("refiner", param="crf.mode")
DATASETS = Registry("dataset", param="data.dataset")  # Dataset subclasses (pipeline.datasets.base)
