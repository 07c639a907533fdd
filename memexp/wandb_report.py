"""Build a W&B report for one sweep, faceted by model, sequence length and batch.

    python -m memexp.wandb_report SWEEP_DIR [--entity E] [--project P] [--group G] [--save | --dry-run]

Per model: peak memory and step time against sequence length (per batch) and against batch (per
sequence length) on log axes, one line per strategy; per workload the memory-time trade-off and
the jobs' memory timelines; then the aggregate run's plots and results table. `--dry-run`
writes the report's specification as JSON (`wandb_report.json` in the sweep folder).

Building needs neither network nor API key, so it runs (and is tested) anywhere; only `--save`
talks to W&B, and it needs the sweep's runs uploaded first (`wandb sync`). The report reads
runs by their W&B group, which defaults to the one `memexp.wandb_sink` derives from the folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wandb_workspaces.reports.v2 as wr
from wandb_workspaces import expr

from memexp.logs import log_to_stderr
from memexp.results import DamagedRecord, read_result
from memexp.sweepdir import PLOTS_DIR, result_files_in
from memexp.wandb_sink import (
    BATCH_KEY,
    DEFAULT_PROJECT,
    JOB_TYPE_AGGREGATE,
    JOB_TYPE_MEASURE,
    PEAK_MIB_KEY,
    PLOT_KEY_PREFIX,
    RESULTS_TABLE_KEY,
    SEQ_LEN_KEY,
    STEP_MS_KEY,
    TIMELINE_TABLE_KEY,
    sweep_group,
)

log = logging.getLogger(__name__)

# Where the resolved job config keeps what a report facets by and groups lines by.
STRATEGY_CONFIG_KEY = "strategy.name"
MODEL_CONFIG_KEY = "model.name"
SEQ_CONFIG_KEY = "seq.len"
BATCH_CONFIG_KEY = "batch.size"
# The attributes of a panel the `--dry-run` specification shows (those a panel has).
SPEC_FIELDS = ("title", "x", "y", "log_x", "log_y", "groupby", "media_keys", "table_name")
SPEC_FILE = "wandb_report.json"


@dataclass(frozen=True)
class Workload:
    """One model at one sequence length and batch: the cell a report never averages across."""

    model: str
    seq_len: int
    batch_size: int


def sweep_workloads(sweep_dir: Path) -> list[Workload]:
    """The workloads the sweep's records ran (unreadable or unconfigured records left out)."""
    found = set()
    for path in result_files_in(sweep_dir):
        try:
            result = read_result(path)
        except DamagedRecord:
            continue
        if result.model and result.seq_len and result.batch_size:
            found.add(Workload(result.model, result.seq_len, result.batch_size))
    return sorted(found, key=lambda w: (w.model, w.seq_len, w.batch_size))


def build_report(
    sweep_dir: Path,
    entity: str | None,
    project: str,
    group: str | None = None,
    workloads: list[Workload] | None = None,
) -> wr.Report:
    """The report object, built offline; `entity=None` leaves it to be filled in before saving.

    One section per model, never averaging across models, sequence lengths or batches: scaling
    against sequence length is drawn per (model, batch), against batch per (model, sequence
    length), each on log axes with one line per strategy; the trade-off and the memory
    timelines per workload; then the aggregate run's plots and results table.
    """
    group = group or sweep_group(Path(sweep_dir))
    workloads = sweep_workloads(Path(sweep_dir)) if workloads is None else workloads
    runsets = _Runsets(entity or "", project, group)
    blocks: list[Any] = [
        wr.P(
            "One section per model. In a scaling panel each line is one checkpointing strategy "
            "and each point one job; panels never mix models, sequence lengths or batches."
        )
    ]
    for model in sorted({w.model for w in workloads}):
        mine = [w for w in workloads if w.model == model]
        blocks.append(wr.H2(f"model {model}"))
        blocks += _scaling_grids(runsets, model, mine)
        blocks += [_workload_grid(runsets, workload) for workload in mine]
    blocks += [wr.H2("sweep aggregate"), _aggregate_grid(runsets, Path(sweep_dir))]
    return wr.Report(
        project=project,
        entity=entity or "",
        title=f"memexp sweep {group}",
        description=f"Sweep folder: {Path(sweep_dir).resolve()}",
        blocks=blocks,
    )


@dataclass(frozen=True)
class _Runsets:
    """The sweep's runs in W&B, narrowed to one facet."""

    entity: str
    project: str
    group: str

    def jobs(self, name: str, **config: Any) -> wr.Runset:
        """The sweep's measure runs whose config has the given values (`model.name=...`)."""
        where = [expr.Config(key) == value for key, value in config.items()]
        return self._runset(name, JOB_TYPE_MEASURE, where)

    def aggregate(self) -> wr.Runset:
        return self._runset("aggregate", JOB_TYPE_AGGREGATE, [])

    def _runset(self, name: str, job_type: str, where: list[Any]) -> wr.Runset:
        return wr.Runset(
            entity=self.entity,
            project=self.project,
            name=name,
            filters=expr.And(
                expr.Metric("Group") == self.group, expr.Metric("JobType") == job_type, *where
            ),
            pinned_columns=[
                "run:displayName",
                "summary:strategy",
                f"summary:{SEQ_LEN_KEY}",
                f"summary:{BATCH_KEY}",
                "summary:status",
                f"summary:{PEAK_MIB_KEY}",
                f"summary:{STEP_MS_KEY}",
            ],
        )


# Scaling panels: (the axis drawn, the workload field held fixed in each grid, its config key,
# its short name). Workload fields are named as the history keys they are logged under.
SCALING_FACETS = (
    (SEQ_LEN_KEY, BATCH_KEY, BATCH_CONFIG_KEY, "batch"),
    (BATCH_KEY, SEQ_LEN_KEY, SEQ_CONFIG_KEY, "seq"),
)


def _scaling_grids(runsets: _Runsets, model: str, workloads: list[Workload]) -> list[wr.PanelGrid]:
    """Against sequence length per batch, against batch per sequence length, where they vary."""
    grids = []
    for axis, fixed, fixed_key, fixed_name in SCALING_FACETS:
        for value in sorted({getattr(w, fixed) for w in workloads}):
            points = {getattr(w, axis) for w in workloads if getattr(w, fixed) == value}
            if len(points) < 2:
                continue
            name = f"{model} {fixed_name}={value}"
            runset = runsets.jobs(name, **{MODEL_CONFIG_KEY: model, fixed_key: value})
            panels = [
                _scaling(axis, PEAK_MIB_KEY, "Peak memory (MiB)", name),
                _scaling(axis, STEP_MS_KEY, "Step time, median (ms)", name),
            ]
            grids.append(wr.PanelGrid(runsets=[runset], panels=panels))
    return grids


def _scaling(axis: str, metric: str, label: str, facet: str) -> wr.LinePlot:
    """One line per strategy (each job logs one point at its own axis value), log-log."""
    return wr.LinePlot(
        title=f"{label} vs {axis} ({facet})",
        x=axis,
        y=[metric],
        log_x=True,
        log_y=True,
        groupby=wr.Config(STRATEGY_CONFIG_KEY),
        groupby_aggfunc="mean",
        groupby_rangefunc="minmax",
        title_x=axis,
        title_y=label,
        layout=wr.Layout(w=12, h=8),
    )


def _workload_grid(runsets: _Runsets, workload: Workload) -> wr.PanelGrid:
    """One workload's jobs: the memory-time trade-off and each job's memory timeline."""
    name = f"{workload.model} seq={workload.seq_len} batch={workload.batch_size}"
    runset = runsets.jobs(
        name,
        **{
            MODEL_CONFIG_KEY: workload.model,
            SEQ_CONFIG_KEY: workload.seq_len,
            BATCH_CONFIG_KEY: workload.batch_size,
        },
    )
    panels = [
        wr.ScatterPlot(
            title=f"Memory-time trade-off ({name})",
            x=wr.SummaryMetric(STEP_MS_KEY),
            y=wr.SummaryMetric(PEAK_MIB_KEY),
            log_x=True,
            log_y=True,
            layout=wr.Layout(w=12, h=8),
        ),
        wr.WeavePanelSummaryTable(table_name=TIMELINE_TABLE_KEY, layout=wr.Layout(w=12, h=8)),
    ]
    return wr.PanelGrid(runsets=[runset], panels=panels)


def _aggregate_grid(runsets: _Runsets, sweep_dir: Path) -> wr.PanelGrid:
    """The aggregate run's plots (as it logged them, `plots/<name>`) and its results table."""
    plots = sorted(path.stem for path in (sweep_dir / PLOTS_DIR).glob("*.png"))
    panels: list[Any] = [
        wr.WeavePanelSummaryTable(table_name=RESULTS_TABLE_KEY, layout=wr.Layout(w=24, h=10))
    ]
    if plots:
        media = [f"{PLOT_KEY_PREFIX}{name}" for name in plots]
        panels.insert(0, wr.MediaBrowser(title="Plots", media_keys=media, num_columns=2))
    return wr.PanelGrid(runsets=[runsets.aggregate()], panels=panels)


def specification(report: wr.Report) -> dict[str, Any]:
    """What the report shows, as plain data: each panel grid's runs (its filter) and panels."""

    def plain(value: Any) -> Any:
        if value is None or isinstance(value, str | int | float | bool):
            return value
        if isinstance(value, list):
            return [plain(item) for item in value]
        if isinstance(value, wr.Config):
            return f"config:{value.name}"
        return str(value)

    blocks = []
    for block in report.blocks:
        if isinstance(block, wr.PanelGrid):
            panels = [
                {"type": type(panel).__name__}
                | {key: plain(getattr(panel, key)) for key in SPEC_FIELDS if hasattr(panel, key)}
                for panel in block.panels
            ]
            runsets = [{"name": r.name, "filters": r.filters} for r in block.runsets]
            blocks.append({"type": "PanelGrid", "runsets": runsets, "panels": panels})
        else:
            blocks.append({"type": type(block).__name__, "text": plain(getattr(block, "text", ""))})
    return {"title": report.title, "description": report.description, "blocks": blocks}


def _title(panel: Any) -> str:
    """A panel's title; a table panel has none, its table's name says what it shows."""
    return getattr(panel, "title", None) or getattr(panel, "table_name", "")


def _describe(report: wr.Report) -> str:
    lines = [report.title, report.description]
    for block in report.blocks:
        if isinstance(block, wr.PanelGrid):
            lines += [f"  {type(panel).__name__}: {_title(panel)}" for panel in block.panels]
        elif isinstance(block, wr.H2):
            lines.append(str(block.text))
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m memexp.wandb_report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep folder (Hydra multirun dir)")
    parser.add_argument("--entity", default=os.environ.get("WANDB_ENTITY"))
    parser.add_argument("--project", default=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT))
    parser.add_argument("--group", help="W&B group of the sweep's runs (default: from the folder)")
    parser.add_argument("--save", action="store_true", help="upload (needs API key and network)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"write the report's specification as JSON to SWEEP_DIR/{SPEC_FILE} (no key needed)",
    )
    return parser.parse_args(argv)


def _save(args: argparse.Namespace) -> int:
    """Save to W&B, turning every failure into one line on stderr and exit status 1."""
    import wandb

    try:
        api = wandb.Api()
        entity = args.entity or api.default_entity
        report = build_report(args.sweep_dir, entity, args.project, args.group).save()
    except wandb.errors.UsageError:
        log.error("cannot save the report: no W&B API key (run `wandb login` or set WANDB_API_KEY)")
        return 1
    except Exception as exc:
        reason = next(iter(str(exc).strip().splitlines()), "")
        log.error(
            "cannot save the report (%s: %s); check the network and that the sweep's runs were "
            "uploaded with `wandb sync`",
            type(exc).__name__,
            reason,
        )
        return 1
    print(report.url)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    log_to_stderr()
    if not args.sweep_dir.is_dir():
        log.error("not a sweep folder: %s", args.sweep_dir)
        return 2
    if args.save:
        return _save(args)
    report = build_report(args.sweep_dir, args.entity, args.project, args.group)
    if args.dry_run:
        path = args.sweep_dir / SPEC_FILE
        path.write_text(json.dumps(specification(report), indent=2) + "\n")
        print(path)
        return 0
    print(_describe(report))
    log.info("built offline; pass --save to upload it, which needs a W&B API key and network")
    return 0


if __name__ == "__main__":
    sys.exit(main())
