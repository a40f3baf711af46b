import json

import pytest

from pipeline.ablation import combinations, markdown_table, parse_grid, read_row
from pipeline.config import ParamsError


def test_grid_values_are_parsed_as_yaml_and_expanded_to_every_combination():
    grid = parse_grid(["cam.method=cam,gradcam", "rw.enabled=true,false"])
    assert grid == {"cam.method": ["cam", "gradcam"], "rw.enabled": [True, False]}
    assert len(combinations(grid)) == 4
    assert {"cam.method": "gradcam", "rw.enabled": False} in combinations(grid)


def test_unknown_param_and_bad_spec_are_named():
    with pytest.raises(ParamsError, match="cam.nope"):
        parse_grid(["cam.nope=1,2"])
    with pytest.raises(ParamsError, match="key=value1,value2"):
        parse_grid(["cam.method"])


def test_row_reads_stage_metrics_and_marks_disabled_stages(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/labels.json").write_text(json.dumps(
        {"cam": {"miou": 28.9}, "crf": {"miou": 39.2}, "rw": {"miou": 30.0, "enabled": False}}))
    (tmp_path / "metrics/segmenter.json").write_text(json.dumps({"miou": 22.4}))
    row = read_row({"rw.enabled": False}, tmp_path)
    assert row == {"rw.enabled": False, "CAM": 28.9, "CRF seeds": 39.2, "random walk": "off", "segmenter (val)": 22.4}
    table = markdown_table([row])
    assert table.splitlines()[0] == "| rw.enabled | CAM | CRF seeds | random walk | segmenter (val) |"
    assert "| False | 28.9 | 39.2 | off | 22.4 |" in table
