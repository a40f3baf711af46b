import pytest
import yaml

from pipeline.config import ParamsError, defaults, load_params, validate
from pipeline.presets import preset


def test_repo_params_file_is_valid_and_complete():
    params = load_params("params.yaml")
    assert set(params) == set(defaults())
    raw = yaml.safe_load(open("params.yaml"))
    for ns, values in defaults().items():
        assert set(raw[ns]) == set(values), f"params.yaml namespace {ns} differs from the schema"


def test_unknown_key_is_named():
    with pytest.raises(ParamsError, match=r"crf\.iterationz"):
        validate({"crf": {"iterationz": 3}})


def test_unknown_namespace_is_named():
    with pytest.raises(ParamsError, match="'crff'"):
        validate({"crff": {}})


def test_wrong_type_is_named():
    with pytest.raises(ParamsError, match=r"cam\.epochs: expected int"):
        validate({"cam": {"epochs": "ten"}})
    with pytest.raises(ParamsError, match=r"crf\.enabled: expected bool"):
        validate({"crf": {"enabled": "false"}})


def test_out_of_range_is_named():
    with pytest.raises(ParamsError, match=r"crf\.gt_prob.*above the maximum"):
        validate({"crf": {"gt_prob": 1.5}})
    with pytest.raises(ParamsError, match=r"cam\.lr.*below the minimum"):
        validate({"cam": {"lr": -1}})


def test_bad_choice_is_named():
    with pytest.raises(ParamsError, match=r"data\.dataset"):
        validate({"data": {"dataset": "imagenet"}})


def test_int_is_accepted_for_float_and_defaults_fill_missing_keys():
    params = validate({"rw": {"beta": 10}})
    assert params["rw"]["beta"] == 10.0 and isinstance(params["rw"]["beta"], float)
    assert params["rw"]["logt"] == defaults()["rw"]["logt"]


def test_list_items_are_checked():
    with pytest.raises(ParamsError, match=r"cam\.scales: items must be float"):
        validate({"cam": {"scales": [1.0, "big"]}})
    with pytest.raises(ParamsError, match=r"export\.formats: unknown format 'tiff'"):
        validate({"export": {"formats": ["voc", "tiff"]}})


def test_missing_file_and_bad_yaml_name_the_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cam: [unclosed")
    with pytest.raises(ParamsError, match="bad.yaml"):
        load_params(bad)


def test_tiny_preset_is_valid():
    validate(preset("tiny"))


def test_committed_params_yaml_is_the_demo_preset_rendered():
    """One source of defaults: params.yaml is `wsss params --preset demo`, byte for byte."""
    from pathlib import Path

    from pipeline.config import render_params

    committed = (Path(__file__).resolve().parents[1] / "params.yaml").read_text()
    assert committed == render_params(preset("demo"))


@pytest.mark.parametrize("name", ["demo", "tiny", "photos", "psa", "irnet", "seam", "sccam"])
def test_every_preset_is_valid(name):
    validate(preset(name))


def test_published_presets_hold_the_papers_settings():
    psa, irnet = preset("psa"), preset("irnet")
    assert (psa["rw"]["beta"], psa["rw"]["logt"], psa["rw"]["alpha"], psa["affinity"]["stride"]) == (8.0, 8, 16.0, 8)
    assert (psa["crf"]["alpha_fg"], psa["crf"]["alpha_bg"], psa["crf"]["bilateral_srgb"]) == (4.0, 32.0, 13.0)
    assert (irnet["crf"]["fg_threshold"], irnet["crf"]["bg_threshold"], irnet["crf"]["bilateral_sxy"]) == (0.30, 0.05, 50.0)
    assert (irnet["rw"]["beta"], irnet["affinity"]["stride"]) == (10.0, 4)
    # IRNet's constant background score 0.25 <=> (1 - m)^alpha = m at m = 0.25
    assert abs((1 - 0.25) ** irnet["rw"]["alpha"] - 0.25) < 1e-3
    seam = preset("seam")
    assert (seam["cam"]["training"], seam["cam"]["training_options"], seam["cam"]["crop_size"]) == ("seam", {"scale": 0.3, "weight": 1.0}, 448)
    assert seam["rw"] == psa["rw"] and seam["crf"] == psa["crf"]
    assert preset("sccam")["cam"]["training_options"] == {"k": 10, "weight": 5.0, "rounds": 3}


def test_stage_paths_match_dvc_yaml():
    """Every path pipeline/paths.py names is an output or dependency in dvc.yaml, spelled the same, and
    every metrics file dvc.yaml declares is in its METRICS table."""
    from pathlib import Path

    import yaml

    import pipeline.paths as paths_module

    root = Path(__file__).resolve().parents[1]
    graph = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    declared = set()
    for stage in graph.values():
        for kind in ("deps", "outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                declared.add(str(next(iter(entry))) if isinstance(entry, dict) else str(entry))
    paths = {name: str(v) for name, v in vars(paths_module).items() if isinstance(v, Path) and name.isupper()}
    undeclared_ok = {"DIGEST_CACHE", "SALIENCY_CACHE"}  # a stat cache beside the output, not tracked
    for name, path in paths.items():
        if name in undeclared_ok:
            continue
        assert path in declared or any(d.startswith(path + "/") for d in declared), (name, path)
    declared_metrics = {str(next(iter(e))) if isinstance(e, dict) else str(e)
                        for stage in graph.values() for e in stage.get("metrics", [])}
    assert declared_metrics <= {str(p) for p in paths_module.METRICS.values()}, declared_metrics
