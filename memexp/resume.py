"""Finish a sweep in its own folder: skip the jobs already measured with the same config, rerun the rest.

    python -m memexp -m model=tiny strategy=none,full,sqrt resume=outputs/multirun/<day>/<time>_<tag>

`resume=DIR` makes DIR the sweep folder (`hydra.sweep.dir`, or `hydra.run.dir` for a single run;
see `memexp/conf/config.yaml`). Each job then looks at its own folder: an `ok` record made with the same
config means the job is done and is skipped; anything else is measured again, and the end-of-sweep
callback aggregates every record on disk, old and new.

"The same config" is a hash of the job's resolved config, stored in the record, because job
numbers follow the order of the overrides: folder 2 of a sweep rerun with its overrides in another
order holds another job. The hash leaves out `resume` and `logger` (they change where results go,
not what is measured) and replaces `device.type: auto` by the device it means on this machine, so
a CPU sweep resumed on a GPU machine is measured again rather than mixed.

Nothing measured is overwritten: a record about to be replaced (failed, or made with another
config) is kept beside it as `result.previous-<n>.json`, and a folder that already holds records is
refused unless `resume` names it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from memexp.config import ConfigError, resolve_device
from memexp.results import STATUS_OK, RunResult, read_result, write_json_atomic
from memexp.sweepdir import RESULT_FILE, read_sweep_overrides

# Where the hash lives in a record (`RunResult.extra`), and what it leaves out.
CONFIG_HASH_KEY = "config_hash"
NOT_MEASUREMENT_KEYS = ("resume", "logger")
# Exit status when a folder is refused: nothing ran (a job that fails makes it 1).
REFUSED_EXIT_CODE = 2


def resume_or(resume: str | None, fresh_dir: str) -> str:
    """`hydra.sweep.dir` / `hydra.run.dir`: the folder being resumed, else a fresh one."""
    return fresh_dir if resume is None else str(resume)


def register_resolvers() -> None:
    """`${memexp_resume_or:${resume},<fresh folder>}`, used by memexp/conf/config.yaml's `hydra` section."""
    OmegaConf.register_new_resolver("memexp_resume_or", resume_or, replace=True)


def config_hash(cfg: DictConfig) -> str:
    """A stable hash of what a job measures: its resolved config, less where results go."""
    config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    for key in NOT_MEASUREMENT_KEYS:
        config.pop(key, None)
    # A bad device is the job's own error to report; the hash then keeps the value as written.
    with contextlib.suppress(ConfigError, KeyError, TypeError):
        config["device"]["type"] = resolve_device(
            config["device"]["type"], torch.cuda.is_available()
        )
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recorded_hash(record: RunResult) -> str | None:
    return record.extra.get(CONFIG_HASH_KEY)


def already_measured(cfg: DictConfig, job_dir: Path) -> bool:
    """True (and says so) when resuming and `job_dir` holds an `ok` record of this very config."""
    path = Path(job_dir) / RESULT_FILE
    if cfg.get("resume") is None or not path.is_file():
        return False
    record = read_result(path)
    if record.status != STATUS_OK or recorded_hash(record) != config_hash(cfg):
        return False
    print(f"[memexp] already measured with this config: {path} (kept, job skipped)", flush=True)
    return True


def _previous_name(path: Path, index: int) -> Path:
    return path.with_name(f"{path.stem}.previous-{index}{path.suffix}")


def keep_previous_record(job_dir: Path) -> Path | None:
    """Move a record this job is about to replace (and its timeline) aside; returns where it went.

    The kept record is rewritten only to point at its kept timeline; every figure stays as it was.
    """
    record_path = Path(job_dir) / RESULT_FILE
    if not record_path.is_file():
        return None
    index = 1
    while _previous_name(record_path, index).exists():
        index += 1
    record = json.loads(record_path.read_text())
    timeline = record_path.parent / str(record.get("timeline_file"))
    if record.get("timeline_file") and timeline.is_file():
        record["timeline_file"] = timeline.rename(_previous_name(timeline, index)).name
    kept = _previous_name(record_path, index)
    write_json_atomic(kept, record)
    record_path.unlink()
    print(f"[memexp] {record_path} is measured again; the old record is kept as {kept}", flush=True)
    return kept


def _holds_records(folder: Path, multirun: bool) -> bool:
    pattern = f"*/{RESULT_FILE}" if multirun else RESULT_FILE
    return any(folder.glob(pattern))


def check_folder(folder: Path, resume: str | None, multirun: bool) -> None:
    """Refuse, before any job starts, to run into a folder of results unless resuming it."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if resume is None:
        if _holds_records(folder, multirun):
            raise ConfigError(
                key,
                str(folder),
                f"a folder without results; add resume={folder} to finish what ran there, "
                "or choose another folder",
            )
        return
    if not Path(resume).is_dir():
        raise ConfigError("resume", resume, "an existing sweep folder (the one to finish)")
    if Path(resume).resolve() != folder.resolve():
        raise ConfigError(
            "resume",
            resume,
            f"the folder the jobs run in ({key}={folder}); set only one of the two",
        )


def _without_resume(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.lstrip("+~").startswith("resume=")]


def describe_override_change(sweep_dir: Path, overrides: list[str]) -> str | None:
    """A warning when a resumed sweep is launched with other overrides than the ones that made it."""
    before = read_sweep_overrides(sweep_dir)
    if before is None or _without_resume(before[0]) == _without_resume(overrides):
        return None
    return (
        f"[memexp] warning: the sweep in {sweep_dir} was made with overrides "
        f"{' '.join(_without_resume(before[0]))!r}, now {' '.join(_without_resume(overrides))!r}; "
        "jobs are matched by config, so a job whose folder holds another config is measured again"
    )


def _stop_on_refusal(folder: Path, resume: str | None, multirun: bool) -> None:
    try:
        check_folder(folder, resume, multirun)
    except ConfigError as error:
        # Hydra turns a callback's exception into a warning and launches the jobs anyway;
        # SystemExit is what stops it before the first job.
        print(f"[memexp] refused: {error}", file=sys.stderr, flush=True)
        raise SystemExit(REFUSED_EXIT_CODE) from error


class SweepFolderGuard(Callback):
    """Runs before any job: a folder that holds results must be resumed explicitly."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        _stop_on_refusal(sweep_dir, config.get("resume"), multirun=True)
        if config.get("resume") is not None:
            warning = describe_override_change(sweep_dir, list(config.hydra.overrides.task))
            if warning:
                print(warning, flush=True)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _stop_on_refusal(Path(config.hydra.run.dir), config.get("resume"), multirun=False)
