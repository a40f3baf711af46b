"""Screenshots of a run's report pages, taken in headless Chromium (bench/browser.py), for docs/img/.

    python bench/report_screenshots.py RUN_DIR [OUT_DIR]    # default OUT_DIR: docs/img

Writes report_index.png and report_worst.png; fails when a page logs an error."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser import Browser  # noqa: E402


def main() -> None:
    run = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("docs/img")
    with Browser() as b:
        for page_name, shot in (("index.html", "report_index.png"), ("worst.html", "report_worst.png")):
            page = b.open(run / "reports" / page_name)
            page.eval("Promise.all(Array.from(document.images).map(i => { i.loading = 'eager'; return i.decode()"
                      ".catch(() => null); }))", await_promise=True)
            if page.errors:
                raise SystemExit(f"{page_name}: {page.errors}")
            print(page.screenshot(out / shot, width=1200, height=1500))


if __name__ == "__main__":
    main()
