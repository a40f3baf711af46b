"""The DVC graph tells the truth about code: each stage's deps cover every file its code can run
(imports, followed through the library, and the built-ins of the registries it resolves names in),
and nothing else; the library has no import cycle; registries import their parts only when used."""
import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from pipeline import registry
from pipeline.code_graph import CodeGraph, check_stage_deps, compact_deps

REPO = Path(__file__).resolve().parents[1]
GRAPH = CodeGraph(REPO)
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_stage_lists_exactly_the_code_it_runs():
    problems = check_stage_deps(STAGES, GRAPH)
    assert not problems, "dvc.yaml deps disagree with the code (`wsss deps STAGE` prints what to list):\n" + \
        "\n".join(problems)


def test_a_removed_dep_is_named():
    stages = copy.deepcopy(STAGES)
    stages["train_aff"]["deps"].remove("pipeline/refine/affinity_training.py")
    problems = check_stage_deps(stages, GRAPH)
    assert problems == ["stage train_aff: runs pipeline/refine/affinity_training.py but its deps do not list it"]
    # a folder dep that hides code the stage never runs is named too
    stages = copy.deepcopy(STAGES)
    stages["train_cam"]["deps"].append("pipeline/refine")
    assert any(p.startswith("stage train_cam: dep pipeline/refine holds code the stage never runs")
               for p in check_stage_deps(stages, GRAPH))


def test_the_closure_follows_imports_and_registries():
    aff = GRAPH.stage_files("train_aff")
    assert "pipeline/refine/affinity_training.py" in aff  # imported by the stage's library call
    assert "pipeline/models/backbones.py" in aff  # through the backbone registry (BACKBONES.get)
    assert "pipeline/datasets/voc.py" in aff  # images are read through the dataset registry
    assert "pipeline/presets.py" not in aff  # presets reach a stage only through params.yaml
    cam = GRAPH.stage_files("train_cam")
    assert "pipeline/cam/objectives.py" in cam and "pipeline/refine/seeds.py" not in cam
    assert "pipeline/refine/seeds.py" in GRAPH.stage_files("crf")  # REFINERS.get in the crf stage's code
    assert compact_deps(GRAPH.stage_files("prepare"), GRAPH).count("pipeline/datasets") == 1


def test_no_import_cycle_in_the_library():
    assert GRAPH.cycles() == []


def test_an_import_cycle_is_found(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "stages").mkdir()
    (tmp_path / "pipeline" / "a.py").write_text("from pipeline.b import g\n")
    (tmp_path / "pipeline" / "b.py").write_text("def g():\n    from pipeline import a  # inside a function: still a cycle\n")
    (tmp_path / "pipeline" / "c.py").write_text("import pipeline.a\n")
    assert CodeGraph(tmp_path).cycles() == [["pipeline.a", "pipeline.b"]]


def test_config_imports_no_registered_part():
    code = textwrap.dedent("""
        import sys
        from pipeline.config import load_params
        load_params("params.yaml")
        print(sorted(m for m in sys.modules if m.startswith("pipeline")))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["pipeline", "pipeline.config", "pipeline.registry"]


def test_each_registry_declares_where_its_builtins_are_registered():
    for reg in registry.ALL:
        loaded = reg.load_builtins()
        for name, module in reg.builtins.items():
            assert loaded[name].__module__ == module, (reg.kind, name)
        assert set(reg.builtin_names()) <= set(reg.names())


def test_params_take_their_choices_from_the_registries():
    from pipeline.config import SCHEMA

    assert SCHEMA["cam"]["method"].choices == registry.CAM_METHODS.builtin_names()
    assert SCHEMA["crf"]["mode"].choices == registry.REFINERS.builtin_names()
    assert SCHEMA["data"]["dataset"].choices == registry.DATASETS.builtin_names()
    assert SCHEMA["seg"]["backbone"].choices == registry.BACKBONES.builtin_names()


def test_bench_scripts_import(tmp_path):
    """A library rename must not leave a bench script importing a name that is gone."""
    for script in sorted((REPO / "bench").glob("*.py")):
        code = f"import runpy, sys; sys.argv = ['x', '--help']; runpy.run_path({str(script)!r}, run_name='not_main')"
        res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
        assert res.returncode == 0, f"{script.name}: {res.stderr[-2000:]}"


def test_wsss_deps_names_the_plugin_modules_a_stage_runs(tmp_path, monkeypatch):
    import pipeline.registry as reg_module
    from pipeline.code_graph import plugin_deps
    from pipeline.config import defaults, with_overrides

    monkeypatch.setattr(reg_module, "_LOADED_PLUGINS", {})
    plugin = tmp_path / "myplug_deps.py"
    plugin.write_text("from pipeline.cam.methods import ClassActivationMap\n\n\nclass MyCAM(ClassActivationMap):\n"
                      "    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    params = with_overrides(defaults(), ["cam.method=myplug_deps:MyCAM"])
    assert plugin_deps("make_cam", GRAPH, params) == [str(plugin.resolve())]  # make_cam resolves cam.method
    assert plugin_deps("crf", GRAPH, params) == []  # crf never runs a CAM method


def test_every_stage_makes_one_library_call_of_one_shape():
    """stages/<name>.py calls run_<name>(prepared, params, <input stores / checkpoints>..., out, *, keyword
    facts): the prepared data first (a folder or an open PreparedData), the params second, what the
    stage writes last, and the device, resume file, thresholds as keywords. (prepare makes the
    prepared data and export is also `wsss export`'s API: they keep their own.)"""
    import ast
    import importlib
    import inspect

    for stage in GRAPH.stage_names():
        if stage in ("digest_data", "prepare", "export"):
            continue
        tree = ast.parse((REPO / "stages" / f"{stage}.py").read_text())
        where = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                 and any(a.name == f"run_{stage}" for a in n.names)]
        assert len(where) == 1, f"stages/{stage}.py does not import run_{stage}"
        fn = getattr(importlib.import_module(where[0]), f"run_{stage}")
        params = list(inspect.signature(fn).parameters.values())
        positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert positional[:2] == ["prepared", "params"] and positional[-1] == "out", (stage, positional)
        for p in params:
            if p.name in ("device", "resume", "cam_threshold", "saliency_store"):
                assert p.kind is p.KEYWORD_ONLY, (stage, p.name)
