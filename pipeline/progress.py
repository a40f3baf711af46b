"""Progress bars and the one-line-per-stage log."""
from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

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


@dataclass
class StageTiming:
    """What a stage block reports: ``n`` items processed, ``extra`` a short note for the log line."""

    n: int = 0
    extra: str = ""


@contextmanager
def stage_timer(stage: str, unit: str = "img") -> Iterator[StageTiming]:
    """Logs ``stage <name>: N img in T s (R img/s)`` when the block ends.

    The block sets ``timing.n`` to the number of items it processed and may set ``timing.extra``
    (a short string) to add to the line.
    """
    timing = StageTiming()
    t0 = time.perf_counter()
    yield timing
    dt = time.perf_counter() - t0
    rate = timing.n / dt if dt > 0 else float("inf")
    extra = f"; {timing.extra}" if timing.extra else ""
    log.info("stage %s: %d %s in %.1f s (%.1f %s/s)%s", stage, timing.n, unit, dt, rate, unit, extra)
