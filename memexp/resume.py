"""Finish a sweep in its own folder: skip the jobs already measured with the same config, rerun the rest.

    python -m memexp -m model=tiny strategy=none,full,sqrt resume=outputs/multirun/<day>/<time>_<tag>

`resume=DIR` makes DIR the sweep folder (`hydra.sweep.dir`, or `hydra.run.dir` for a single run;
see `memexp/conf/config.yaml`). A job whose config has an `ok` record anywhere in the sweep is skipped;
anything else (missing, failed, interrupted, damaged) is measured again, and the end-of-sweep
callback aggregates every record on disk, old and new.

"The same config" is a hash of the job's resolved config, stored in the record, because job
numbers follow the order of the overrides: folder 2 of a sweep rerun with its overrides in another
order holds another job. The hash leaves out `resume` and `logger` (they change where results go,
not what is measured) and replaces `device.type: auto` by the device it means on this machine, so
a CPU sweep resumed on a GPU machine is measured again rather than mixed.

Nothing measured is lost: a failed record of the same config is kept beside the new one as
`result.previous-<n>.json`; a record of another config in the folder a job now runs in moves,
with the `.hydra/` it was made with (copied before any job starts, since Hydra rewrites it) and
its timeline, to a new numbered folder; a damaged record is kept as `result.damaged-<n>.json`. A
folder that already holds records is refused unless `resume` names it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from memexp.config import ConfigError, resolve_device
from memexp.results import (
    STATUS_OK,
    DamagedRecord,
    RunResult,
    read_result,
    set_aside_damaged,
    write_json_atomic,
)
from memexp.sweepdir import (
    HYDRA_DIR,
    RECORD_FILE_PATTERNS,
    RECORD_HYDRA_DIR,
    RESULT_FILE,
    job_folders,
    new_job_folder,
    read_sweep_overrides,
    result_files_in,
)

log = logging.getLogger(__name__)

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
    import torch  # here: registering the resolvers (`memexp --help`) must not load torch

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


def _hash_or_none(cfg: DictConfig) -> str | None:
    """The config's hash; None when it cannot be resolved (the job records that error itself)."""
    try:
        return config_hash(cfg)
    except Exception:  # any resolution failure: an interpolation, a resolver, a missing value
        return None


def read_own_record(job_dir: Path) -> RunResult | None:
    """The record in `job_dir`; a damaged one is named, set aside and counts as none."""
    path = Path(job_dir) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return read_result(path)
    except DamagedRecord as damaged:
        kept = set_aside_damaged(path)
        log.warning("%s; kept as %s, the job runs again", damaged, kept.name)
        return None


def ok_record_of(digest: str, sweep_dir: Path) -> Path | None:
    """Where `sweep_dir` holds an `ok` record of the config hashed `digest` (damaged ones are
    skipped: the job whose folder holds one reports it)."""
    candidates = [Path(sweep_dir) / RESULT_FILE, *result_files_in(sweep_dir)]
    for path in candidates:
        with contextlib.suppress(DamagedRecord, OSError):
            record = read_result(path)
            if record.status == STATUS_OK and recorded_hash(record) == digest:
                return path
    return None


def snapshot_job_configs(sweep_dir: Path) -> None:
    """Before any job of a resumed sweep starts: copy each job folder's `.hydra/` beside its record.

    Hydra rewrites `.hydra/` with the new job's config before memexp runs; the copy is what a
    record of another config is moved away with. An existing copy (from a resume that stopped
    before its job ran) is the older, right one and stays.
    """
    for folder in job_folders(sweep_dir):
        snapshot = folder / RECORD_HYDRA_DIR
        if (folder / RESULT_FILE).is_file() and not snapshot.exists():
            shutil.copytree(folder / HYDRA_DIR, snapshot)


def drop_snapshots(sweep_dir: Path) -> None:
    """After a resumed sweep: the copies left are of folders no job ran in, whose `.hydra/` is
    still the record's own."""
    for snapshot in Path(sweep_dir).glob(f"*/{RECORD_HYDRA_DIR}"):
        shutil.rmtree(snapshot)


def _restore_snapshot(job_dir: Path) -> None:
    """Put the record's own `.hydra/` back: the folder is again exactly as the record left it."""
    snapshot = job_dir / RECORD_HYDRA_DIR
    if snapshot.is_dir():
        shutil.rmtree(job_dir / HYDRA_DIR)
        snapshot.rename(job_dir / HYDRA_DIR)


def _move_records(job_dir: Path, sweep_dir: Path) -> Path:
    """Move the records of another config, their timelines and their `.hydra/` to a new job folder."""
    target = new_job_folder(sweep_dir)
    for pattern in RECORD_FILE_PATTERNS:
        for path in job_dir.glob(pattern):
            path.rename(target / path.name)
    snapshot = job_dir / RECORD_HYDRA_DIR
    if snapshot.is_dir():
        snapshot.rename(target / HYDRA_DIR)
    log.warning("%s held a record of another config: moved with its config to %s", job_dir, target)
    return target


def already_measured(cfg: DictConfig, job_dir: Path, sweep_dir: Path | None = None) -> bool:
    """True (and says so) when resuming and the sweep holds an `ok` record of this very config.

    Jobs are matched by config, never by folder: an `ok` record of the config anywhere in
    `sweep_dir` (default: `job_dir`, a single run) means the job is done. A record of another
    config in `job_dir` is never lost: when this job is skipped the folder is put back as it
    was; when this job runs, the record moves to a new job folder with its own `.hydra/`.
    """
    if cfg.get("resume") is None:
        return False
    job_dir = Path(job_dir)
    sweep_dir = Path(sweep_dir) if sweep_dir is not None else job_dir
    own = read_own_record(job_dir)
    digest = _hash_or_none(cfg)
    measured = ok_record_of(digest, sweep_dir) if digest is not None else None
    # A config that does not resolve has no hash; its own earlier record has none either.
    another_config = own is not None and recorded_hash(own) != digest
    if another_config and measured is not None:
        _restore_snapshot(job_dir)
    elif another_config and sweep_dir != job_dir:
        _move_records(job_dir, sweep_dir)
    else:  # a single run's own older record is kept beside the new one (keep_previous_record)
        shutil.rmtree(job_dir / RECORD_HYDRA_DIR, ignore_errors=True)
    if measured is None:
        return False
    log.info("already measured with this config: %s (kept, job skipped)", measured)
    return True


def _previous_name(path: Path, index: int) -> Path:
    return path.with_name(f"{path.stem}.previous-{index}{path.suffix}")


def keep_previous_record(job_dir: Path) -> Path | None:
    """Move a record this job is about to replace (and its timeline) aside; returns where it went.

    The kept record is rewritten only to point at its kept timeline; every figure stays as it was.
    A damaged record is set aside as `result.damaged-<n>.json` instead.
    """
    record_path = Path(job_dir) / RESULT_FILE
    if read_own_record(job_dir) is None:
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
    log.info("%s is measured again; the old record is kept as %s", record_path, kept)
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


def check_writable(folder: Path, key: str) -> None:
    """Refuse, in one line naming it, a folder this process cannot create or write into."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ConfigError(
            key, str(folder), f"a folder this process can write ({error.strerror or error})"
        ) from error


def _without_resume(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.lstrip("+~").startswith("resume=")]


def describe_override_change(sweep_dir: Path, overrides: list[str]) -> str | None:
    """A warning when a resumed sweep is launched with other overrides than the ones that made it."""
    before = read_sweep_overrides(sweep_dir)
    if before is None or _without_resume(before[0]) == _without_resume(overrides):
        return None
    return (
        f"the sweep in {sweep_dir} was made with overrides "
        f"{' '.join(_without_resume(before[0]))!r}, now {' '.join(_without_resume(overrides))!r}; "
        "jobs are matched by config: one measured ok anywhere in the sweep is skipped"
    )


def _stop_on_refusal(folder: Path, resume: str | None, multirun: bool) -> None:
    try:
        check_folder(folder, resume, multirun)
        check_writable(folder, "hydra.sweep.dir" if multirun else "hydra.run.dir")
    except ConfigError as error:
        # Hydra turns a callback's exception into a warning and launches the jobs anyway;
        # SystemExit is what stops it before the first job.
        log.error("refused: %s", error)
        raise SystemExit(REFUSED_EXIT_CODE) from error


class SweepFolderGuard(Callback):
    """Runs before any job: a folder that holds results must be resumed explicitly."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        _stop_on_refusal(sweep_dir, config.get("resume"), multirun=True)
        if config.get("resume") is not None:
            snapshot_job_configs(sweep_dir)
            overrides = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
            warning = describe_override_change(sweep_dir, list(overrides))  # type: ignore[arg-type]
            if warning:
                log.warning(warning)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _stop_on_refusal(Path(config.hydra.run.dir), config.get("resume"), multirun=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        drop_snapshots(Path(config.hydra.sweep.dir))
