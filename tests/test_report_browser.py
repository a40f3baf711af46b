"""Issue 27: the report and the worst-first page opened in headless Chromium (Debian's ``chromium``,
driven over DevTools by bench/browser.py): no console errors, every image loads, the figures shown are
the run's metrics, sorting, paging and the class filter work; the upper bound is this run's or marked
as from another run. Skipped, saying why, where no Chromium is installed (.ci/run installs it)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from browser import Browser, find_chromium  # noqa: E402

from pipeline.presets import preset  # noqa: E402
from synthetic import run_stages  # noqa: E402

try:
    import websocket  # noqa: F401
    HAVE_WEBSOCKET = True
except ImportError:
    HAVE_WEBSOCKET = False

pytestmark = pytest.mark.skipif(find_chromium() is None or not HAVE_WEBSOCKET,
                                reason="no Chromium on PATH (apt-get install chromium) or no websocket-client package: "
                                       "the report is not checked in a browser here")

STAGES = ("prepare", "saliency", "train_cam", "make_cam", "crf", "train_aff", "random_walk", "instances", "train_seg",
          "upper_bound", "evaluate")


def _run(work: Path, params: dict, stages=STAGES) -> None:
    run_stages(work, params, stages)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The tiny demo's graph with the upper bound measured by the run itself."""
    work = tmp_path_factory.mktemp("report")
    params = preset("tiny")
    params["seg"]["upper_bound"] = True
    _run(work, params)
    return work, params


@pytest.fixture(scope="module")
def browser():
    with Browser() as b:
        yield b


def _metrics(work: Path, name: str) -> dict:
    return json.loads((work / "metrics" / f"{name}.json").read_text())


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def _all_images_load(page) -> list[bool]:
    return page.eval("Promise.all(Array.from(document.images).map(i => { i.loading = 'eager'; "
                     "return i.decode().then(() => i.naturalWidth > 0, () => false); }))", await_promise=True)


def _open_clean(browser, path: Path):
    """The page at ``path``, checked: no console error or failed load, and every image decodes."""
    page = browser.open(path)
    assert page.errors == []
    loaded = _all_images_load(page)
    assert loaded and all(loaded)
    return page


def test_the_browser_check_sees_a_broken_image_and_a_script_error(tmp_path, browser):
    page_file = tmp_path / "broken.html"
    page_file.write_text('<!doctype html><html><body><img src="missing.png"><script>null.x;</script></body></html>')
    page = browser.open(page_file)
    errors = page.errors
    assert any("exception" in e for e in errors) and any("load failed" in e or "ERR_FILE_NOT_FOUND" in e for e in errors)
    assert _all_images_load(page) == [False]


def test_report_renders_without_errors_and_shows_this_runs_figures(run, browser):
    work, _ = run
    page = _open_clean(browser, work / "reports/index.html")
    shown = page.eval("Array.from(document.querySelectorAll('tr[data-stage]')).map(r => "
                      "[r.dataset.stage, r.cells[2].textContent, r.className])")
    want = {"cam": _metrics(work, "cam"), "crf": _metrics(work, "crf"), "rw": _metrics(work, "rw"),
            "segmenter": _metrics(work, "segmenter"), "upper_bound": _metrics(work, "segmenter_gt")}
    assert [s for s, _, _ in shown] == list(want)
    for stage, miou, css in shown:
        assert miou == _fmt(want[stage]["miou"]), stage
        assert css != "foreign", stage  # measured by this run: not marked
    assert want["upper_bound"]["provenance"]["params_digest"]
    assert page.eval("document.getElementById('worst-link').getAttribute('href')") == "worst.html"


def test_worst_first_page_loads_sorts_pages_and_filters(run, browser):
    from pipeline.datasets.prepared import PreparedData
    from pipeline.store import Store
    from pipeline.worst_first import image_iou

    work, params = run
    page = _open_clean(browser, work / "reports/worst.html")
    rows = "Array.from(document.querySelectorAll('#body tr'))"
    # default: pseudo masks, worst first; images without a pseudo-mask IoU (eval split) after them
    col = page.eval("data = window.WSSS_WORST; data.stages.findIndex(s => s.key === 'rw') + 3")
    values = page.eval(f"{rows}.map(r => r.cells[{col}].textContent)")
    numbers = [float(v) for v in values if v != "–"]
    assert numbers == sorted(numbers) and values[: len(numbers)] == [f"{v:.1f}" for v in numbers]
    # what a row shows is the image's IoU recomputed from the pseudo-mask store
    prepared = PreparedData(params["data"], work / "data/prepared")
    pseudo = Store(work / "data/pseudo.zarr")
    first = page.eval(f"{rows}[0].dataset.id")
    assert values[0] == _fmt(image_iou(pseudo.read("mask", first), prepared.gt(first)))
    # clicking the CAM column sorts by it, ascending, then descending
    cam_col = page.eval("window.WSSS_WORST.stages.findIndex(s => s.key === 'cam') + 3")
    page.eval("document.querySelector('th[data-key=cam]').click()")
    up = [float(v) for v in page.eval(f"{rows}.map(r => r.cells[{cam_col}].textContent)") if v != "–"]
    page.eval("document.querySelector('th[data-key=cam]').click()")
    down = [float(v) for v in page.eval(f"{rows}.map(r => r.cells[{cam_col}].textContent)") if v != "–"]
    assert up == sorted(up) and down == sorted(down, reverse=True) and len(up) > 3
    # paging: 10 rows a page
    total = page.eval("window.WSSS_WORST.rows.length")
    page.eval("window.WSSS_WORST.page_size = 10; document.getElementById('class-filter').dispatchEvent(new Event('change'))")
    assert page.eval(f"{rows}.length") == 10
    assert page.eval("document.getElementById('page-info').textContent").startswith(f"rows 1–10 of {total}")
    page.eval("document.getElementById('next').click()")
    assert page.eval("document.getElementById('page-info').textContent").startswith(f"rows 11–20 of {total}")
    # the class filter keeps exactly the images that have the class
    cls = prepared.class_names[1]
    expected = page.eval(f"window.WSSS_WORST.rows.filter(r => r.classes.includes({json.dumps(cls)})).length")
    page.eval("window.WSSS_WORST.page_size = 1000; const s = document.getElementById('class-filter'); "
              f"s.value = {json.dumps(cls)}; s.dispatchEvent(new Event('change'))")
    shown = page.eval(f"{rows}.map(r => r.cells[2].textContent)")
    assert 0 < len(shown) == expected < total and all(cls in c.split(", ") for c in shown)
    assert page.errors == []


def test_an_upper_bound_from_another_run_is_marked_red(run, browser, tmp_path):
    work, params = run
    other = tmp_path / "run"
    shutil.copytree(work, other, ignore=shutil.ignore_patterns("*.lock", ".wsss.lock"))
    foreign = json.loads((other / "metrics/segmenter_gt.json").read_text())
    foreign["provenance"]["params_digest"] = "0123456789abcdef"  # as if measured with other params
    (tmp_path / "other_gt.json").write_text(json.dumps(foreign))
    params = json.loads(json.dumps(params))
    params["seg"].update(upper_bound=False, upper_bound_from=str(tmp_path / "other_gt.json"))
    _run(other, params, ("upper_bound", "evaluate"))
    page = browser.open(other / "reports/index.html")
    assert page.errors == []
    row = page.eval("(r => [r.className, r.cells[0].textContent, getComputedStyle(r).color])"
                    "(document.querySelector('tr[data-stage=upper_bound]'))")
    assert row[0] == "foreign" and "from another run" in row[1] and row[2] == "rgb(192, 0, 0)"
    note = page.eval("document.querySelector('li.foreign').textContent")
    assert "FROM ANOTHER RUN" in note and "params digest 0123456789abcdef" in note


def test_without_an_upper_bound_the_report_says_it_was_not_measured(run, tmp_path):
    work, params = run
    other = tmp_path / "run"
    shutil.copytree(work, other, ignore=shutil.ignore_patterns(".wsss.lock"))
    params = json.loads(json.dumps(params))
    params["seg"]["upper_bound"] = False
    _run(other, params, ("upper_bound", "evaluate"))
    m = json.loads((other / "metrics/segmenter_gt.json").read_text())
    assert m["measured"] is False and "seg.upper_bound is false" in m["reason"]
    assert not (other / "models/seg_gt/segmenter.pt").exists() and (other / "models/seg_gt/NOT_TRAINED.txt").is_file()
    text = (other / "reports/index.html").read_text()
    assert 'data-stage="upper_bound"' not in text and "Upper bound: not measured in this run" in text
    np.testing.assert_equal(json.loads((other / "metrics/segmenter.json").read_text())["miou"],
                            _metrics(work, "segmenter")["miou"])
