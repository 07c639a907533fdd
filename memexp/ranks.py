"""Run one function in every rank of a process group, and bring each rank's answer back.

Two ways a job gets its ranks:

* **on this machine** (`device=cpu`, or GPUs of one host): `run_ranks` starts `world_size`
  processes itself (torch.multiprocessing, `spawn`), joined through a file store in a temporary
  folder (no port to pick or to collide on), and collects what each returns;
* **started by the cluster** (SLURM's `srun`, or `torchrun`): every rank already runs the whole
  job; `cluster_rank()` reads who it is from the environment, and `run_ranks` joins the group
  and runs the function in this process, every rank getting every rank's answer.

Either way a rank that raises, dies or outlasts `timeout_s` never hangs the job: `RankFailure`
names the rank and carries its error and traceback, and the processes started here are ended.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

# How often the parent looks at its ranks while waiting for their answers.
POLL_S = 0.2
# How long a rank that has answered may take to leave the process group and exit.
EXIT_GRACE_S = 10.0
# torchrun's variables, and the ones SLURM's srun sets in every task it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID")
# The port rank 0 listens on under SLURM: fixed per job, from its id, in the unprivileged range.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000


class RankFailure(RuntimeError):
    """A rank raised, died or ran past the timeout: which rank, and what it said."""

    def __init__(self, rank: int, error_type: str, message: str, trace: str = "") -> None:
        self.rank = rank
        self.error_type = error_type
        self.trace = trace
        super().__init__(f"rank {rank}: {error_type}: {message}")


@dataclass(frozen=True)
class Rank:
    """Who this process is in the group, and the local device index it should use."""

    rank: int
    world_size: int
    local_rank: int


@dataclass(frozen=True)
class ClusterRank(Rank):
    """A rank the cluster started, with the address of rank 0's store."""

    master_addr: str
    master_port: int


def cluster_rank() -> ClusterRank | None:
    """This process's rank when the cluster started it as one of several, else None.

    torchrun's variables win; otherwise SLURM's (srun sets them in every task), rank 0's host being
    the first of the job's nodes (submitit's SLURM environment expands SLURM's node list) and the
    port fixed by the job's id, so every task derives the same address without talking.
    """
    env = os.environ
    if all(name in env for name in TORCHRUN_VARIABLES) and int(env["WORLD_SIZE"]) > 1:
        return ClusterRank(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env["LOCAL_RANK"]),
            master_addr=env["MASTER_ADDR"],
            master_port=int(env["MASTER_PORT"]),
        )
    if all(name in env for name in SLURM_VARIABLES) and int(env["SLURM_NTASKS"]) > 1:
        from submitit.slurm.slurm import SlurmJobEnvironment

        return ClusterRank(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env["SLURM_LOCALID"]),
            master_addr=SlurmJobEnvironment().hostnames[0],
            master_port=SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % SLURM_PORT_SPAN,
        )
    return None


def run_ranks(
    work: Callable[[Rank], Any], world_size: int, timeout_s: float, backend: str
) -> list[Any]:
    """`work(rank)` in every rank of a `backend` process group; the answers in rank order.

    `work` must be picklable (a module-level function or a `functools.partial` of one): local
    ranks are fresh processes. When the cluster started this process as one of a group, it is
    one rank and the answers are gathered to every rank; a group of another size than
    `world_size` is refused (a sweep asked the cluster for one size and then for another).
    """
    started = cluster_rank()
    if started is None:
        return _local_ranks(work, world_size, timeout_s, backend)
    if started.world_size != world_size:
        raise ValueError(
            f"the cluster started {started.world_size} ranks for this job but it asks for "
            f"parallel.world_size={world_size}: hydra/launcher=slurm asks for its tasks once per "
            "submission, so submit one world size at a time"
        )
    return _as_cluster_rank(work, started, timeout_s, backend)


def _as_cluster_rank(
    work: Callable[[Rank], Any], me: ClusterRank, timeout_s: float, backend: str
) -> list[Any]:
    dist.init_process_group(
        backend,
        init_method=f"tcp://{me.master_addr}:{me.master_port}",
        rank=me.rank,
        world_size=me.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        answer = work(me)
        answers: list[Any] = [None] * me.world_size
        dist.all_gather_object(answers, answer)
        return answers
    finally:
        dist.destroy_process_group()


def _rank_main(
    index: int,
    work: Callable[[Rank], Any],
    world_size: int,
    store_file: str,
    timeout_s: float,
    backend: str,
    answers: Any,
) -> None:
    """One local rank: join the group, run `work`, put (rank, ok, answer or error) on the queue.

    A failure is put on the queue before the rank leaves the group: leaving is what makes the
    other ranks fail too, and the parent should hear the first failure first.
    """
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{store_file}",
            rank=index,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        answers.put((index, True, work(Rank(index, world_size, index))))
    except BaseException as error:
        answers.put((index, False, (type(error).__name__, str(error), traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _started(processes: list[Any]) -> Iterator[None]:
    """Whatever happens while waiting, no rank started here outlives the call."""
    try:
        yield
    finally:
        deadline = time.monotonic() + EXIT_GRACE_S
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()


def _local_ranks(
    work: Callable[[Rank], Any], world_size: int, timeout_s: float, backend: str
) -> list[Any]:
    context = mp.get_context("spawn")
    answers = context.Queue()
    with tempfile.TemporaryDirectory(prefix="memexp-ranks-") as folder:
        store_file = str(Path(folder) / "store")
        processes = [
            context.Process(
                target=_rank_main,
                args=(index, work, world_size, store_file, timeout_s, backend, answers),
                daemon=True,
            )
            for index in range(world_size)
        ]
        for process in processes:
            process.start()
        with _started(processes):
            return _collect(answers, processes, timeout_s)


def _collect(answers: Any, processes: list[Any], timeout_s: float) -> list[Any]:
    """Every rank's answer; on the first failure, a death or the deadline, end all and raise."""
    deadline = time.monotonic() + timeout_s
    received: dict[int, Any] = {}
    while len(received) < len(processes):
        try:
            index, ok, payload = answers.get(timeout=POLL_S)
        except queue.Empty:
            _raise_if_dead_or_late(answers, processes, received, deadline, timeout_s)
            continue
        if not ok:
            _end(processes)
            raise RankFailure(index, *payload)
        received[index] = payload
    return [received[index] for index in range(len(processes))]


def _end(processes: list[Any]) -> None:
    """Stop every rank at once: the others may be waiting in a collective for the one that failed."""
    for process in processes:
        process.kill()


def _raise_if_dead_or_late(
    answers: Any,
    processes: list[Any],
    received: dict[int, Any],
    deadline: float,
    timeout_s: float,
) -> None:
    """RankFailure for a rank that exited without answering, or for the ranks still out at the
    deadline. A rank's last answer may still be on its way when its exit is seen: the queue is
    read once more before the rank counts as dead."""
    waiting = [index for index in range(len(processes)) if index not in received]
    for index in waiting:
        code = processes[index].exitcode
        if code is None:
            continue
        with contextlib.suppress(queue.Empty):
            answers_index, ok, payload = answers.get(timeout=EXIT_GRACE_S)
            if ok:
                received[answers_index] = payload
                return
            _end(processes)
            raise RankFailure(answers_index, *payload)
        _end(processes)
        raise RankFailure(index, "RankExited", f"the process exited with code {code} unanswered")
    if time.monotonic() > deadline:
        _end(processes)
        raise RankFailure(
            waiting[0],
            "TimeoutError",
            f"ranks {waiting} gave no answer within {timeout_s:g} s (measure.rank_timeout_s); "
            "every rank was stopped",
        )
