"""Build a W&B report for one sweep: memory and step time against sequence length, their trade-off.

    python -m memexp.wandb_report SWEEP_DIR [--entity E] [--project P] [--group G] [--save]

Building needs neither network nor API key, so it runs (and is tested) anywhere; only `--save`
talks to W&B, and it needs the sweep's runs uploaded first (`wandb sync`). The report reads
runs by their W&B group, which defaults to the one `memexp.wandb_sink` derives from the folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import wandb_workspaces.reports.v2 as wr
from wandb_workspaces import expr

from memexp.wandb_sink import (
    DEFAULT_PROJECT,
    JOB_TYPE_MEASURE,
    PEAK_MIB_KEY,
    SEQ_LEN_KEY,
    STEP_MS_KEY,
    sweep_group,
)

# Where the resolved job config keeps the strategy: runs are grouped (one line each) by it.
STRATEGY_CONFIG_KEY = "strategy.name"


def build_report(
    sweep_dir: Path, entity: str | None, project: str, group: str | None = None
) -> wr.Report:
    """The report object, built offline; `entity=None` leaves it to be filled in before saving."""
    group = group or sweep_group(Path(sweep_dir))
    runset = wr.Runset(
        entity=entity or "",
        project=project,
        name=f"sweep {group}",
        filters=expr.And(expr.Metric("Group") == group, expr.Metric("JobType") == JOB_TYPE_MEASURE),
        pinned_columns=[
            "run:displayName",
            "summary:strategy",
            f"summary:{SEQ_LEN_KEY}",
            "summary:status",
            f"summary:{PEAK_MIB_KEY}",
            f"summary:{STEP_MS_KEY}",
        ],
    )
    panels = [
        _against_seq_len(PEAK_MIB_KEY, "Peak memory (MiB)"),
        _against_seq_len(STEP_MS_KEY, "Step time, median (ms)"),
        wr.ScatterPlot(
            title="Memory-time trade-off",
            x=wr.SummaryMetric(STEP_MS_KEY),
            y=wr.SummaryMetric(PEAK_MIB_KEY),
            layout=wr.Layout(w=24, h=8),
        ),
    ]
    return wr.Report(
        project=project,
        entity=entity or "",
        title=f"memexp sweep {group}",
        description=f"Sweep folder: {Path(sweep_dir).resolve()}",
        blocks=[
            wr.P("Each line is one checkpointing strategy; each point is one job of the sweep."),
            wr.PanelGrid(runsets=[runset], panels=panels),
        ],
    )


def _against_seq_len(metric: str, label: str) -> wr.LinePlot:
    """One line per strategy across the sweep's jobs (each job logs one point at its seq_len)."""
    return wr.LinePlot(
        title=f"{label} vs sequence length",
        x=SEQ_LEN_KEY,
        y=[metric],
        groupby=wr.Config(STRATEGY_CONFIG_KEY),
        groupby_aggfunc="mean",
        groupby_rangefunc="minmax",
        title_x="sequence length",
        title_y=label,
        layout=wr.Layout(w=12, h=8),
    )


def _describe(report: wr.Report) -> str:
    lines = [report.title, report.description]
    for block in report.blocks:
        if isinstance(block, wr.PanelGrid):
            lines += [f"  {type(panel).__name__}: {panel.title}" for panel in block.panels]
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
    return parser.parse_args(argv)


def _save(args: argparse.Namespace) -> int:
    """Save to W&B, turning every failure into one line on stderr and exit status 1."""
    import wandb

    try:
        api = wandb.Api()
        entity = args.entity or api.default_entity
        report = build_report(args.sweep_dir, entity, args.project, args.group).save()
    except wandb.errors.UsageError:
        print(
            "cannot save the report: no W&B API key (run `wandb login` or set WANDB_API_KEY)",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:
        reason = next(iter(str(exc).strip().splitlines()), "")
        print(
            f"cannot save the report ({type(exc).__name__}: {reason}); check the network and "
            "that the sweep's runs were uploaded with `wandb sync`",
            file=sys.stderr,
        )
        return 1
    print(report.url)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"not a sweep folder: {args.sweep_dir}", file=sys.stderr)
        return 2
    if args.save:
        return _save(args)
    print(_describe(build_report(args.sweep_dir, args.entity, args.project, args.group)))
    print("(built offline; pass --save to upload it, which needs a W&B API key and network)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
