"""`python -m memexp` / `memexp`: compose the config with Hydra, run one job per combination."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from memexp import CONF_DIR, resume
from memexp.configure import register_configs

register_configs()


# Absolute, so the `memexp` console script (whose module is not `__main__`) finds it too.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    # Here, not at the top: `--help` and `--cfg` never import the runner, W&B or pandas.
    from memexp.runner import run_job
    from memexp.wandb_sink import log_job, sweep_group

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    identity = {
        "sweep_dir": str(Path(hydra_cfg.sweep.dir).resolve()) if multirun else None,
        "job_num": int(hydra_cfg.job.num) if multirun else None,
        "overrides": list(hydra_cfg.overrides.task),
    }
    job_dir = Path(hydra_cfg.runtime.output_dir)
    if resume.already_measured(cfg, job_dir):
        return
    result = run_job(cfg, job_dir, identity)
    group_dir = Path(hydra_cfg.sweep.dir) if multirun else job_dir
    log_job(
        cfg.logger,
        OmegaConf.to_container(cfg, resolve=True),
        result,
        job_dir,
        sweep_id=sweep_group(group_dir),
        run_name=" ".join(identity["overrides"]) or "defaults",
    )


def cli() -> None:
    """Exit 0 unless a callback stopped the process: `memexp.callbacks.SweepSummary` exits 1 when a
    job ended in `error` (OOM or infeasible are answers, not failures), and
    `memexp.resume.SweepFolderGuard` exits 2 for a refused folder."""
    main()
    sys.exit(0)


if __name__ == "__main__":
    cli()
