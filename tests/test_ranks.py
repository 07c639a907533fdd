"""memexp.ranks: local ranks joined by gloo answer in rank order; a rank that raises, dies or hangs
fails the call with its rank named, never hangs it; a cluster-started rank reads who it is.

The rank functions live at module level: local ranks are fresh (spawned) processes that import
them by name.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from memexp.ranks import SLURM_PORT_BASE, ClusterRank, Rank, RankFailure, cluster_rank, run_ranks


def summed_ranks(rank: Rank) -> tuple[int, int]:
    """This rank's number and the sum of every rank's, through a gloo all-reduce."""
    total = torch.tensor([rank.rank])
    dist.all_reduce(total)
    return rank.rank, int(total.item())


def second_rank_raises(rank: Rank) -> int:
    if rank.rank == 1:
        raise ValueError("rank one cannot go on")
    dist.barrier()  # waits for rank 1 forever, unless the failure ends it
    return rank.rank


def every_rank_hangs(rank: Rank) -> int:
    time.sleep(3600)
    return rank.rank


def second_rank_exits(rank: Rank) -> int:
    if rank.rank == 1:
        os._exit(3)
    return rank.rank


@pytest.mark.slow
def test_local_ranks_answer_in_rank_order_through_gloo() -> None:
    assert run_ranks(summed_ranks, 3, timeout_s=300, backend="gloo") == [(0, 3), (1, 3), (2, 3)]


@pytest.mark.slow
def test_a_rank_that_raises_fails_the_call_with_its_error() -> None:
    with pytest.raises(RankFailure) as failure:
        run_ranks(second_rank_raises, 2, timeout_s=300, backend="gloo")
    assert failure.value.rank == 1
    assert failure.value.error_type == "ValueError"
    assert "rank 1: ValueError: rank one cannot go on" in str(failure.value)
    assert "second_rank_raises" in failure.value.trace


@pytest.mark.slow
def test_ranks_that_hang_are_stopped_at_the_timeout() -> None:
    with pytest.raises(RankFailure) as failure:
        run_ranks(every_rank_hangs, 2, timeout_s=5, backend="gloo")
    assert failure.value.rank == 0
    assert failure.value.error_type == "TimeoutError"
    assert "ranks [0, 1] gave no answer within 5 s" in str(failure.value)


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_call_with_its_exit_code() -> None:
    with pytest.raises(RankFailure, match="rank 1: RankExited: the process exited with code 3"):
        run_ranks(second_rank_exits, 2, timeout_s=300, backend="gloo")


def test_no_cluster_rank_outside_a_cluster_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    assert cluster_rank() is None
    # One task is no group: a plain SLURM job runs the job alone.
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert cluster_rank() is None


def test_torchrun_variables_name_the_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    values |= {"MASTER_ADDR": "node7", "MASTER_PORT": "29500"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    assert cluster_rank() == ClusterRank(5, 8, 1, "node7", 29500)


def test_srun_variables_name_the_rank_and_rank_zeros_host(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    values = {"SLURM_JOB_ID": "1234", "SLURM_PROCID": "9", "SLURM_NTASKS": "16"}
    values |= {"SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[03-04]"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    assert cluster_rank() == ClusterRank(9, 16, 1, "gpu03", SLURM_PORT_BASE + 1234)


def test_a_cluster_group_of_another_size_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}
    values |= {"MASTER_ADDR": "node7", "MASTER_PORT": "29500"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"started 4 ranks .* parallel.world_size=8"):
        run_ranks(summed_ranks, 8, timeout_s=1, backend="gloo")
