import pytest
import yaml

from pipeline.config import ParamsError, defaults, load_params, preset, validate


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
