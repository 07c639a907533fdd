"""Aggregate time and peak memory of `summarize_sweep` for 100, 1,000 and 10,000 jobs.

    python scripts/bench_sweep.py SOURCE_SWEEP [--sizes 100 1000 10000] [--out FILE]

The records are made from a real sweep's (a small `tiny` sweep: its ok jobs' `result.json` and
`timeline.json`): each synthetic workload takes another sequence length and batch size, and
each job another strategy label (a `strategy.*` override), with memory and time scaled so that
workloads differ. Every size runs in its own process, so its peak RSS is its own:

* table, cold: records read, index written, results.csv and summary.md, no figures;
* table, indexed: the same again, every row taken from the index;
* figures: `memexp.plots.draw_all` on the table.

Writes a markdown table (default `scripts/results/bench_sweep.md`) with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from memexp import plots
from memexp.summarize import no_figures, summarize_sweep
from memexp.sweepdir import PLOTS_DIR, RESULT_FILE, TIMELINE_FILE, result_files_in
from memexp.text import markdown_table

JOBS_PER_WORKLOAD = 15
HERE = Path(__file__).resolve().parent


def _sources(source: Path) -> list[tuple[dict[str, Any], str | None]]:
    """The source sweep's ok records (one per strategy) and their timelines' text."""
    found: dict[str, tuple[dict[str, Any], str | None]] = {}
    for path in result_files_in(source):
        record = json.loads(path.read_text())
        timeline = path.parent / (record.get("timeline_file") or TIMELINE_FILE)
        if record["status"] == "ok":
            text = timeline.read_text() if timeline.is_file() else None
            found.setdefault(record["strategy"], (record, text))
    return list(found.values())


def make_sweep(source: Path, dest: Path, count: int) -> None:
    """`count` job folders under `dest`, JOBS_PER_WORKLOAD per synthetic workload."""
    templates = _sources(source)
    for num in range(count):
        workload, slot = divmod(num, JOBS_PER_WORKLOAD)
        record, timeline = templates[slot % len(templates)]
        scale = 1 + workload % 16
        record = {
            **record,
            "job_num": num,
            "seq_len": 16 * scale,
            "batch_size": 2 ** (workload // 16 % 5),
            "overrides": [*record["overrides"], f"strategy.variant={slot // len(templates)}"],
            "peak_bytes": int(record["peak_bytes"] * scale * (1 + 0.01 * slot)),
            "step_ms_median": record["step_ms_median"] * scale * (1 + 0.02 * (slot % 7)),
            "sweep_dir": str(dest),
            "job_dir": str(dest / str(num)),
        }
        if record["strategy"] == "none" and slot >= len(templates):
            record["strategy"] = "full"  # one baseline per workload
        folder = dest / str(num)
        folder.mkdir(parents=True)
        (folder / RESULT_FILE).write_text(json.dumps(record))
        if timeline is not None:
            (folder / TIMELINE_FILE).write_text(timeline)


def _timed(step: Any) -> tuple[Any, str]:
    """The step's value, and its wall time with the CPU time it used: on a shared machine the
    wall time counts other people's work, the CPU time only this step's."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = step()
    return value, f"{time.perf_counter() - wall:.1f} ({time.process_time() - cpu:.1f})"


def measure_one(source: Path, count: int) -> dict[str, Any]:
    """Make a sweep of `count` jobs in a temporary folder and time its aggregate."""
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        sweep = Path(tmp) / "sweep"
        make_sweep(source, sweep, count)
        output, cold = _timed(lambda: summarize_sweep(sweep, draw=no_figures))
        _, indexed = _timed(lambda: summarize_sweep(sweep, draw=no_figures))
        figures, drawing = _timed(lambda: plots.draw_all(output.frame, sweep / PLOTS_DIR))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "jobs": count,
        "workloads": int(output.frame.workload.nunique()),
        "table_cold_s": cold,
        "table_indexed_s": indexed,
        "figures_s": drawing,
        "figures": sum(1 for f in figures if f.path),
        "peak_rss_mib": peak_kib / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a small real sweep folder")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_sweep.md")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: one size, as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.source, args.one)))
        return 0
    load_before = os.getloadavg()
    rows = []
    for size in args.sizes:
        child = [sys.executable, __file__, str(args.source), "--one", str(size)]
        done = subprocess.run(child, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(result, flush=True)
        rows.append(
            [
                f"{result['jobs']:,}",
                str(result["workloads"]),
                result["table_cold_s"],
                result["table_indexed_s"],
                f"{result['figures_s']} ({result['figures']} figures)",
                f"{result['peak_rss_mib']:.0f}",
            ]
        )
        _write(args, rows, load_before)
    return 0


def _write(args: argparse.Namespace, rows: list[list[str]], load_before: tuple) -> None:
    """The table so far: each size is written as it finishes, so a long run leaves its rows."""
    load_after = os.getloadavg()
    header = ["jobs", "workloads", "table, cold", "table, indexed", "figures"]
    lines = [
        "# Aggregating a sweep at scale",
        "",
        f"`python scripts/bench_sweep.py {args.source.name} --sizes "
        f"{' '.join(map(str, args.sizes))}`: records made from the real `tiny` sweep "
        f"`{args.source.name}`, {JOBS_PER_WORKLOAD} jobs a workload. Table: records read, "
        "`index.jsonl`, `results.csv` and `summary.md` without figures (cold: no index; "
        "indexed: run again). Times in seconds: wall (CPU time of the process). Peak RSS of "
        "the process that did all three.",
        "",
        f"Machine: {os.cpu_count()} CPU cores, shared; load average (1, 5, 15 min) "
        f"{', '.join(f'{x:.2f}' for x in load_before)} before, "
        f"{', '.join(f'{x:.2f}' for x in load_after)} after.",
        "",
        markdown_table([*header, "peak RSS (MiB)"], rows),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
