"""Hydra launchers as memexp runs them: the presets in memexp/conf/hydra/launcher/ and the one rule they need.

    hydra/launcher=process_per_job   every job in a fresh process on this machine, one at a time
                                     (submitit's local executor)
    hydra/launcher=slurm             every job a SLURM job with one GPU (submitit's SLURM executor),
                                     or with a task and a GPU per rank under a `parallel` mode
    hydra/launcher=parallel          jobs side by side in worker processes (joblib): for CPU and
                                     fake-device sweeps; parallel jobs distort each other's timings

Whatever the launcher, each job writes its own record and the end-of-sweep callback reads the
records from disk, so results and the aggregate do not depend on which launcher ran the jobs.
"""

from __future__ import annotations

import math

from omegaconf import OmegaConf

SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"


def jobs_per_batch(launcher_target: str) -> int | None:
    """`hydra.sweeper.max_batch_size`: how many jobs the sweeper hands the launcher at once.

    submitit's local executor starts every job it is handed at the same moment, so it gets one at
    a time: each job's timings and memory stay its own. Every other launcher gets the whole sweep
    (None): the basic launcher runs jobs one after another anyway, SLURM places them on separate
    GPUs, and joblib's own `n_jobs` says how many run together.
    """
    return 1 if launcher_target == SUBMITIT_LOCAL else None


def ranks_per_node(world_size: int, gpus_per_node: int | str) -> int:
    """SLURM tasks, and GPUs, per node for `world_size` ranks on nodes of `gpus_per_node` GPUs
    (a string when it comes from the environment): one task per rank, each with its own GPU,
    filling whole nodes. A world that does not fill whole nodes is refused rather than spread
    unevenly."""
    gpus_per_node = int(gpus_per_node)
    if world_size <= gpus_per_node:
        return world_size
    if world_size % gpus_per_node:
        raise ValueError(
            f"parallel.world_size={world_size} does not fill nodes of {gpus_per_node} GPUs "
            "(MEMEXP_GPUS_PER_NODE): choose a multiple of it"
        )
    return gpus_per_node


def nodes_for(world_size: int, gpus_per_node: int | str) -> int:
    """SLURM nodes for `world_size` ranks on nodes of `gpus_per_node` GPUs."""
    return math.ceil(world_size / ranks_per_node(world_size, gpus_per_node))


def register_resolvers() -> None:
    """`${memexp_jobs_per_batch:${hydra.launcher._target_}}`, used by memexp/conf/config.yaml;
    `${memexp_ranks_per_node:...}` and `${memexp_nodes:...}`, used by the slurm preset."""
    OmegaConf.register_new_resolver("memexp_jobs_per_batch", jobs_per_batch, replace=True)
    OmegaConf.register_new_resolver("memexp_ranks_per_node", ranks_per_node, replace=True)
    OmegaConf.register_new_resolver("memexp_nodes", nodes_for, replace=True)
