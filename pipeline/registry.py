"""Registries of swappable parts (backbones, CAM methods, CAM training objectives, refiners, datasets), picked by a name in params.

A name resolves, in order, to: a built-in registered with ``@REG.register("name")``; a plugin
advertised by an installed package under the entry-point group ``wsss.plugins`` with the name
``<kind>.<name>`` (e.g. ``cam_method.scorecam = mypkg.cams:ScoreCAM``); or a dotted path
``package.module:Object`` / ``package.module.Object`` given directly in params.

Built-ins are loaded lazily: each registry declares where its built-in names live (``builtins``,
name -> module) and imports those modules on first use, so importing the registry (or
:mod:`pipeline.config`, which takes its choices from it) imports no part, and a stage's code closure
holds only the parts it builds.

A part's own settings come from an options param (``cam.method_options``, ``crf.mode_options``):
keyword args of its constructor, checked by :func:`check_options`.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

ENTRY_POINT_GROUP = "wsss.plugins"
_LOADED_PLUGINS: dict[str, Any] = {}  # "<kind>:<name>" -> the object a plugin name resolved to (this process)


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

    def __init__(self, kind: str, param: str | None = None, builtins: dict[str, str] | None = None):
        self.kind = kind
        self.param = param
        self.builtins = dict(builtins or {})  # built-in name -> module that registers it
        self._items: dict[str, Any] = {}
        self._loaded: set[str] = set()

    def builtin_names(self) -> tuple[str, ...]:
        """The built-in names, known without importing anything."""
        return tuple(self.builtins)

    def _load_builtin(self, name: str) -> None:
        module = self.builtins[name]
        if module not in self._loaded:
            self._loaded.add(module)
            importlib.import_module(module)
        if name not in self._items:
            raise RegistryError(f"{self.kind} {name!r} is declared in {module} but that module does not register it")

    def load_builtins(self) -> dict[str, Any]:
        """Import every built-in's module; return the registered objects by name."""
        for name in self.builtins:
            self._load_builtin(name)
        return dict(self._items)

    def check_name(self, name: str, param: str | None = None) -> None:
        """Raise RegistryError (naming the param) unless ``name`` resolves; a built-in name is
        accepted without importing its module, a plugin is loaded (its import errors surface now)."""
        if name not in self.builtins:
            self.get(name, param)

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
        return sorted(set(self.builtins) | set(self._items) | set(self.plugins()))

    def get(self, name: str, param: str | None = None) -> Any:
        """The object registered, advertised or importable as ``name``. Every failure (unknown name, a
        plugin that cannot be imported or raises while it is imported) is a RegistryError naming the
        param (``param`` or the registry's) and the plugin, with the original exception chained."""
        if name in self.builtins:
            self._load_builtin(name)
        if name in self._items:
            return self._items[name]
        where = f"param {param or self.param}: " if (param or self.param) else ""
        eps = self.plugins()
        if name in eps:
            ep = eps[name]
            obj = self._load(lambda: ep.load(), f"{where}{self.kind} plugin {name!r} (entry point {ep.value!r} "
                                                f"in group {ENTRY_POINT_GROUP!r})")
            _LOADED_PLUGINS[f"{self.kind}:{name}"] = obj
            return obj
        if "." in name or ":" in name:
            obj = self._load(lambda: load_dotted(name), f"{where}{self.kind} plugin {name!r}")
            _LOADED_PLUGINS[f"{self.kind}:{name}"] = obj
            return obj
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


def source_file(obj: Any) -> Path | None:
    """The source file of the module that defines ``obj`` (resolved), or None when it has none."""
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    source = getattr(module, "__file__", None) if module is not None else None
    if source is None:
        try:
            source = inspect.getsourcefile(obj)
        except TypeError:
            source = None
    return Path(source).resolve() if source and Path(source).is_file() else None


def plugin_source_files() -> list[Path]:
    """The source files of every plugin this process has resolved (params name them; loading params
    resolves them): what a result made with plugins was made from besides the library's own code."""
    return sorted({f for f in map(source_file, _LOADED_PLUGINS.values()) if f is not None})


def _at(module: str, *names: str) -> dict[str, str]:
    return {name: module for name in names}


# cam.backbone and seg.backbone both name one
BACKBONES = Registry("backbone", builtins=_at("pipeline.models.backbones", "tiny", "resnet18", "resnet50",
                                                 "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"))
CAM_METHODS = Registry("cam_method", param="cam.method",
                       builtins=_at("pipeline.cam.methods", "cam", "gradcam", "gradcampp"))
CAM_TRAINING = Registry("cam_training", param="cam.training",
                        builtins=_at("pipeline.cam.objectives", "plain", "seam", "sccam"))
REFINERS = Registry("refiner", param="crf.mode", builtins=_at("pipeline.refine.seeds", "affinitynet", "irnet", "margin"))
# Dataset subclasses (pipeline.datasets.base)
DATASETS = Registry("dataset", param="data.dataset",
                    builtins={"demo": "pipeline.datasets.demo", "voc": "pipeline.datasets.voc",
                              "coco": "pipeline.datasets.coco", "folder": "pipeline.datasets.folder",
                              "demo_stuff": "pipeline.datasets.demo_stuff"})
ALL = (BACKBONES, CAM_METHODS, CAM_TRAINING, REFINERS, DATASETS)
