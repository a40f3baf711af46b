"""The project's own import graph, read from the source (ast, nothing imported), and each stage's code
closure: the files whose edits can change what ``stages/<name>.py`` writes, i.e. what its ``deps`` in
dvc.yaml must cover so that ``dvc repro`` re-runs it.

The closure of a module is every project module it imports (at the top or inside a function), the
``__init__.py`` of each package on the way, and, where it resolves a registered name
(``REGISTRY.get(...)``), every module that registry declares for its built-ins
(:mod:`pipeline.registry`). ``wsss deps [STAGE]`` prints it; ``tests/test_code_graph.py`` checks
dvc.yaml against it and that the graph has no import cycle.
"""
from __future__ import annotations

import ast
from functools import cached_property
from pathlib import Path

PACKAGES = ("pipeline", "stages")
RESOLVING_CALLS = {"get", "load_builtins"}  # registry methods that import built-ins


class CodeGraph:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    @cached_property
    def modules(self) -> dict[str, Path]:
        """Dotted module name -> file, for every .py file under the packages."""
        out = {}
        for pkg in PACKAGES:
            for path in sorted((self.root / pkg).rglob("*.py")):
                parts = list(path.relative_to(self.root).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = path
        return out

    def _resolve(self, dotted: str) -> str | None:
        """The longest project module that ``dotted`` names or lies in (``pkg.mod.Name`` -> ``pkg.mod``)."""
        while dotted and dotted not in self.modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    @cached_property
    def _registry_builtins(self) -> dict[str, set[str]]:
        """Registry variable name -> the modules its built-ins live in (from pipeline.registry)."""
        from pipeline import registry

        return {name: set(reg.builtins.values()) for name, reg in vars(registry).items()
                if isinstance(reg, registry.Registry)}

    @cached_property
    def imports(self) -> dict[str, set[str]]:
        """Module -> the project modules it imports directly (package __init__ files not added)."""
        return {name: self._direct(name, path) for name, path in self.modules.items()}

    def _direct(self, name: str, path: Path) -> set[str]:
        tree = ast.parse(path.read_text(), filename=str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        named: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                named.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                named.add(base)
                named.update(f"{base}.{a.name}" for a in node.names)
        found = {self._resolve(n) for n in named} - {None, name}
        return found

    @cached_property
    def registries_resolved(self) -> dict[str, set[str]]:
        """Module -> the names of the registries (``CAM_METHODS``, ...) it resolves names in."""
        out = {}
        for name, path in self.modules.items():
            tree = ast.parse(path.read_text(), filename=str(path))
            out[name] = {node.func.value.id for node in ast.walk(tree)
                         if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                         and node.func.attr in RESOLVING_CALLS and isinstance(node.func.value, ast.Name)
                         and node.func.value.id in self._registry_builtins}
        return out

    @cached_property
    def registry_uses(self) -> dict[str, set[str]]:
        """Module -> the built-in modules of the registries it resolves names in."""
        return {name: set().union(*(self._registry_builtins[r] for r in regs)) if regs else set()
                for name, regs in self.registries_resolved.items()}

    def stage_registries(self, stage: str) -> set[str]:
        """The registries the code of ``stages/<stage>.py`` resolves names in."""
        return set().union(*(self.registries_resolved[m] for m in self.closure(f"stages.{stage}")))

    def _packages_of(self, name: str) -> set[str]:
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in self.modules}

    def closure(self, start: str) -> set[str]:
        """Every module ``start`` can run: imports, their packages' __init__, registries' built-ins."""
        seen, todo = set(), [start]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            todo.extend(self.imports[name] | self.registry_uses[name] | self._packages_of(name))
        return seen

    def stage_names(self) -> list[str]:
        """The stage modules under stages/ (not the shared ``common``)."""
        return sorted(m.split(".", 1)[1] for m in self.modules
                      if m.startswith("stages.") and m != "stages.common")

    def stage_files(self, stage: str) -> list[str]:
        """The closure of ``stages/<stage>.py`` as paths relative to the root, sorted."""
        return sorted(self.modules[m].relative_to(self.root).as_posix() for m in self.closure(f"stages.{stage}"))

    def cycles(self) -> list[list[str]]:
        """Import cycles between modules (strongly connected components of more than one module; a
        package's __init__ importing its own submodules is not counted, as Python resolves it)."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []
        counter = 0
        for root in sorted(self.imports):  # iterative Tarjan
            if root in index:
                continue
            work = [(root, iter(sorted(self.imports[root])))]
            index[root] = low[root] = counter
            counter += 1
            stack.append(root)
            on_stack.add(root)
            while work:
                node, children = work[-1]
                child = next(children, None)
                if child is not None:
                    if child not in index:
                        index[child] = low[child] = counter
                        counter += 1
                        stack.append(child)
                        on_stack.add(child)
                        work.append((child, iter(sorted(self.imports[child]))))
                    elif child in on_stack:
                        low[node] = min(low[node], index[child])
                    continue
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
        return found


def uncovered(files: list[str], deps: list[str]) -> list[str]:
    """The files no dep covers (a dep is a file or a folder)."""
    def covered(f: str) -> bool:
        return any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)

    return [f for f in files if not covered(f)]


def code_deps(deps: list[str]) -> list[str]:
    """The deps that are project code (under pipeline/ or stages/)."""
    return [d for d in deps if d.split("/")[0] in PACKAGES]


def compact_deps(files: list[str], graph: CodeGraph) -> list[str]:
    """``files`` written as deps: a folder when every .py file under it is among them, else the files."""
    wanted = set(files)
    folders = sorted({str(Path(f).parent.as_posix()) for f in files if "/" in f}, key=lambda d: d.count("/"))
    chosen: list[str] = []
    for folder in folders:
        if folder in PACKAGES or any(folder == c or folder.startswith(c + "/") for c in chosen):
            continue
        inside = {p.relative_to(graph.root).as_posix() for p in (graph.root / folder).rglob("*.py")}
        if inside <= wanted:
            chosen.append(folder)
    rest = [f for f in files if not any(f.startswith(c + "/") for c in chosen)]
    return sorted(rest + chosen)


def check_stage_deps(stages: dict, graph: CodeGraph) -> list[str]:
    """Problems with the code deps of dvc.yaml's ``stages`` (its parsed ``stages`` mapping): a file the
    stage's code closure holds that no dep covers, a code dep outside the closure (it would re-run
    the stage for code it never runs), a stage module that has no stage in dvc.yaml. Empty when true."""
    problems = []
    for stage in graph.stage_names():
        if stage not in stages:
            problems.append(f"stages/{stage}.py has no stage {stage!r} in dvc.yaml")
    for stage, spec in stages.items():
        if stage not in graph.stage_names():
            continue
        files = graph.stage_files(stage)
        deps = [d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])]
        for f in uncovered(files, deps):
            problems.append(f"stage {stage}: runs {f} but its deps do not list it")
        for dep in code_deps(deps):
            path = graph.root / dep
            inside = ([p.relative_to(graph.root).as_posix() for p in path.rglob("*.py")] if path.is_dir()
                      else [dep])
            extra = [f for f in inside if f not in files]
            if extra:
                problems.append(f"stage {stage}: dep {dep} holds code the stage never runs: {', '.join(extra)}")
    return problems


def plugin_deps(stage: str, graph: CodeGraph, params: dict) -> list[str]:
    """The plugin modules ``params`` name that ``stage`` runs (through a registry its code resolves
    names in), as deps for dvc.yaml: paths relative to the project root when inside it."""
    from pipeline import config, registry

    by_object = {id(reg): name for name, reg in vars(registry).items() if isinstance(reg, registry.Registry)}
    used = graph.stage_registries(stage)
    out = set()
    for key, reg in config.REGISTERED.items():
        ns, name = key.split(".")
        value = params[ns][name]
        if by_object.get(id(reg)) not in used or value in reg.builtins:
            continue
        path = registry.source_file(reg.get(value, key))
        if path is None:
            continue
        out.add(path.relative_to(graph.root).as_posix() if path.is_relative_to(graph.root) else str(path))
    return sorted(out)
