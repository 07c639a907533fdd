"""The layout of a run or sweep folder, written once: file names, finding records, Hydra's files.

    <sweep>/multirun.yaml              Hydra: the sweep's overrides
    <sweep>/<job>/.hydra/              Hydra: the job's composed config, choices and overrides
    <sweep>/<job>/result.json          memexp: the job's record (memexp.results)
    <sweep>/<job>/timeline.json        memexp: memory over the job's tracked step
    <sweep>/index.jsonl                memexp: a flattened row per job (memexp.sweepindex)
    <sweep>/results.csv, summary.md, plots/   memexp: the aggregate
    <sweep>/results.parquet            memexp: the same table, typed (when pyarrow is installed)
    <sweep>/plans.csv, <list>.csv      memexp: the records' lists as tidy tables (memexp.tidy)
    <sweep>/cache/<figure>-<key>.json  memexp: a workload's strategy-independent figures (memexp.memo)

Everything that looks for records or reads Hydra's files in a sweep folder goes through here,
so the layout can change in one place.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable
from pathlib import Path

import yaml

RESULT_FILE = "result.json"
TIMELINE_FILE = "timeline.json"
RESULTS_CSV = "results.csv"
INDEX_FILE = "index.jsonl"  # memexp.sweepindex: a row per job, appended as each finishes
RESULTS_PARQUET = "results.parquet"
SUMMARY_MD = "summary.md"
PLOTS_DIR = "plots"
CACHE_DIR = "cache"
MULTIRUN_YAML = "multirun.yaml"
HYDRA_DIR = ".hydra"
JOB_OVERRIDES = Path(HYDRA_DIR) / "overrides.yaml"
JOB_CONFIG = Path(HYDRA_DIR) / "config.yaml"
JOB_HYDRA = Path(HYDRA_DIR) / "hydra.yaml"
# On resume, a copy of `.hydra/` taken before any job starts: Hydra rewrites `.hydra/` for the new
# job before memexp sees it, and a record of another config must keep the config it was made with.
RECORD_HYDRA_DIR = ".hydra.of-record"
# A job folder's record files: the record, kept older records and their timelines.
RECORD_FILE_PATTERNS = ("result*.json", "timeline*.json")


def table_csv(name: str) -> str:
    """The file of a tidy table beside `results.csv`: `plans` -> `plans.csv`."""
    return f"{name}.csv"


def cache_file(sweep_dir: Path, figure: str, key: str) -> Path:
    """Where a sweep keeps `figure` of the workload whose key is `key` (memexp.memo)."""
    return Path(sweep_dir) / CACHE_DIR / f"{figure}-{key}.json"


def job_order(folder: Path) -> tuple[int, str]:
    """Numbered job folders in numeric order (2 before 10), anything else after them."""
    name = Path(folder).name
    return (int(name), "") if name.isdigit() else (1 << 30, name)


def result_files_in(sweep_dir: Path) -> list[Path]:
    """The record of every job folder directly under `sweep_dir`, in job order."""
    paths = Path(sweep_dir).glob(f"*/{RESULT_FILE}")
    return sorted(paths, key=lambda path: job_order(path.parent))


def find_result_files(paths: Iterable[str | Path]) -> list[Path]:
    """Every `result.json` named by, or lying under, the paths and globs (sorted, no repeats)."""
    found: dict[Path, None] = {}
    for raw in paths:
        matches = glob.glob(str(raw), recursive=True) if glob.has_magic(str(raw)) else [raw]
        for match in map(Path, matches):
            candidates = sorted(match.rglob(RESULT_FILE)) if match.is_dir() else [match]
            for candidate in candidates:
                if candidate.name == RESULT_FILE and candidate.is_file():
                    found.setdefault(candidate.resolve(), None)
    return sorted(found)


def is_sweep_job(result_file: Path) -> bool:
    """A record Hydra's multirun placed in a numbered job folder (a single run's is not)."""
    folder = Path(result_file).parent
    return folder.name.isdigit() or (folder.parent / MULTIRUN_YAML).is_file()


def sweep_of(result_file: Path) -> Path:
    """The folder a record's aggregate belongs in: `<sweep>` for `<sweep>/<job>/result.json`,
    the run folder itself for a single run's `<run>/result.json`."""
    folder = Path(result_file).parent
    return folder.parent if is_sweep_job(result_file) else folder


def job_folders(sweep_dir: Path) -> list[Path]:
    """Every job folder Hydra set up under `sweep_dir` (it holds `.hydra/`), in job order."""
    folders = {path.parent for path in Path(sweep_dir).glob(f"*/{HYDRA_DIR}") if path.is_dir()}
    return sorted(folders, key=job_order)


def folders_without_record(sweep_dir: Path) -> list[Path]:
    """Job folders Hydra set up that hold no record yet: running, or died before writing it."""
    return [job for job in job_folders(sweep_dir) if not (job / RESULT_FILE).is_file()]


def new_job_folder(sweep_dir: Path) -> Path:
    """Create and return a numbered job folder after every existing one (safe against a
    concurrent job doing the same: the folder is created, never reused)."""
    numbers = [int(p.name) for p in Path(sweep_dir).iterdir() if p.name.isdigit()]
    number = max(numbers, default=-1) + 1
    while True:
        folder = Path(sweep_dir) / str(number)
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            number += 1


def read_job_overrides(job_dir: Path) -> list[str] | None:
    """The task overrides Hydra saved for one job; None when unreadable."""
    try:
        overrides = yaml.safe_load((Path(job_dir) / JOB_OVERRIDES).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return [str(o) for o in overrides or []]


def read_sweep_overrides(sweep_dir: Path) -> tuple[list[str], list[str]] | None:
    """(task overrides, hydra overrides) from Hydra's `multirun.yaml`; None when unreadable."""
    try:
        config = yaml.safe_load((Path(sweep_dir) / MULTIRUN_YAML).read_text())
        overrides = config["hydra"]["overrides"]
        return list(overrides.get("task") or []), list(overrides.get("hydra") or [])
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return None
