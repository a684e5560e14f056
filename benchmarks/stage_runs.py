"""What the scale benchmarks share: the post-generation stages run one after another on an engine, each timed."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

STAGES = ("judge", "dedup", "tag", "split")


def peak_rss_mb() -> int:
    """This process's peak RSS so far (Linux: ru_maxrss is in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_stages(params: dict[str, Any], src: Path, work: Path) -> dict[str, Any]:
    """judge, dedup, tag and split on the engine params name, each reading the last one's output under `work`.

    Returns Ray's start-up time (counted once, apart from the stages) when the engine is Ray, and per stage its
    seconds, rows/s, rows entered and kept, and the peak RSS after it."""
    from synthforge.engine import get_engine
    from synthforge.stages.dedup import run_dedup
    from synthforge.stages.judge import run_judge
    from synthforge.stages.split import run_split
    from synthforge.stages.tag import run_tag

    runners = {"judge": run_judge, "dedup": run_dedup, "tag": run_tag, "split": run_split}
    figures: dict[str, Any] = {"stages": {}}
    if params["engine"]["name"] == "ray":
        t0 = time.perf_counter()
        get_engine(params)
        figures["ray_start_s"] = round(time.perf_counter() - t0, 2)
    for stage in STAGES:
        out = work / stage
        t0 = time.perf_counter()
        stats = runners[stage](params, src, out)
        seconds = time.perf_counter() - t0
        figures["stages"][stage] = {
            "seconds": round(seconds, 2),
            "rows_per_s": round(stats["entered"] / seconds),
            "entered": stats["entered"],
            "kept": stats["kept"],
            "peak_rss_mb": peak_rss_mb(),
        }
        src = out
    return figures
