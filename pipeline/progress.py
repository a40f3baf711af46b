"""Progress bars and the one-line-per-stage log."""
from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager

from tqdm.auto import tqdm

log = logging.getLogger("wsss")


def setup_logging(level: int = logging.INFO) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                            datefmt="%H:%M:%S", stream=sys.stderr)


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False, **kw):
    """A tqdm bar on stderr; refreshes less often when stderr is a log file rather than a terminal."""
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, disable=disable,
                mininterval=1.0 if sys.stderr.isatty() else 15.0, **kw)


@contextmanager
def stage_timer(stage: str, unit: str = "img"):
    """Logs ``stage <name>: N img in T s (R img/s)`` when the block ends.

    The block sets ``counter["n"]`` to the number of items it processed and may add
    ``counter["extra"]`` (a short string) to the line.
    """
    counter = {"n": 0, "extra": ""}
    t0 = time.perf_counter()
    yield counter
    dt = time.perf_counter() - t0
    rate = counter["n"] / dt if dt > 0 else float("inf")
    extra = f"; {counter['extra']}" if counter["extra"] else ""
    log.info("stage %s: %d %s in %.1f s (%.1f %s/s)%s", stage, counter["n"], unit, dt, rate, unit, extra)
