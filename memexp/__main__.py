"""`python -m memexp` / `memexp`: compose the config with Hydra, run one job per combination."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from memexp import CONF_DIR, cli_help
from memexp.configure import register_configs
from memexp.interrupts import INTERRUPTED_EXIT_CODE, stop_on_sigterm

register_configs()


CONFIG_NAME = "config"


# Absolute, so the `memexp` console script (whose module is not `__main__`) finds it too.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=CONFIG_NAME)
def main(cfg: DictConfig) -> float | None:
    """One job; returns its objective (memexp.objective) to the sweeper, None when resume skips it."""
    # Here, not at the top: `--help` and `--cfg` never import the runner, W&B or pandas.
    from memexp.job import run_guarded
    from memexp.objective import job_objective

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    identity = {
        "sweep_dir": str(Path(hydra_cfg.sweep.dir).resolve()) if multirun else None,
        "job_num": int(hydra_cfg.job.num) if multirun else None,
        "overrides": list(hydra_cfg.overrides.task),
    }
    job_dir = Path(hydra_cfg.runtime.output_dir)
    group_dir = Path(hydra_cfg.sweep.dir) if multirun else job_dir
    result = run_guarded(cfg, job_dir, identity, group_dir)
    return job_objective(result, cfg) if result is not None else None


def cli() -> None:
    """Exit 0 unless a callback stopped the process: `memexp.callbacks.SweepSummary` exits 1 when a
    job ended in `error` (OOM or infeasible are answers, not failures), and
    `memexp.resume.SweepFolderGuard` exits 2 for a refused folder.

    Ctrl-C or SIGTERM: the running job has recorded `interrupted`; what finished is summarized
    and aggregated, and the exit status is 130, with no traceback.
    """
    help_text = cli_help.app_help(sys.argv[1:], CONF_DIR, CONFIG_NAME)
    if help_text is not None:  # seconds faster than Hydra's help builder (memexp.cli_help)
        print(help_text)
        sys.exit(0)
    stop_on_sigterm()
    try:
        main()
    except KeyboardInterrupt:
        from memexp.callbacks import finish_interrupted

        finish_interrupted()
        sys.exit(INTERRUPTED_EXIT_CODE)
    sys.exit(0)


if __name__ == "__main__":
    cli()
