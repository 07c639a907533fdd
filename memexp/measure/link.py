"""The host link's bandwidth, measured: what offloading to host memory pays per byte on a GPU."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from memexp.text import MIB

LINK_PROBE_BYTES = 256 * MIB
LINK_PROBE_REPEATS = 5
HOST_LINK_SOURCE = "pinned copies timed on this GPU (median of each direction, best way)"


def measure_host_link_gbps(device: torch.device, nbytes: int = LINK_PROBE_BYTES) -> float:
    """GB/s (10⁹ bytes a second) of a pinned host ↔ `device` copy: the median of
    LINK_PROBE_REPEATS copies each way, the slower way's (offloading pays both ways)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    on_device = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def median_seconds(copy: Callable[[], Any]) -> float:
        copy()  # warm-up
        samples = []
        for _ in range(LINK_PROBE_REPEATS):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            copy()
            torch.cuda.synchronize(device)
            samples.append(time.perf_counter() - start)
        return sorted(samples)[len(samples) // 2]

    to_device = median_seconds(lambda: on_device.copy_(host, non_blocking=True))
    to_host = median_seconds(lambda: host.copy_(on_device, non_blocking=True))
    return nbytes / max(to_device, to_host) / 1e9


# Why offloading's transfer time is added to the step, not hidden under it.
NOT_OVERLAPPED = (
    "not overlapped: copies to host memory run on the compute stream (as save_on_cpu's do) and "
    "a file is written when autograd saves its tensor and read when the backward needs it, so "
    "the step waits for each; copies on a side stream could hide at most the forward's "
    "compute (out) and the backward's (back)"
)


def transfer_ms(nbytes: float, gbps: float) -> float:
    """Milliseconds to move `nbytes` at `gbps` GB/s (10⁹ bytes a second)."""
    return nbytes / (gbps * 1e9) * 1e3


def offload_transfer(
    kind: str,
    out_bytes: float,
    back_bytes: float,
    host_gbps: float | None,
    disk_gbps: float | None,
    through_host: bool,
) -> dict[str, Any]:
    """Transfer time of one step's offloading: bytes / bandwidth, each way.

    `host`: over the host link. `disk`: to the disk, and first over the host link when the
    tensors start on an accelerator (`through_host`), one after the other (memexp.storage
    copies a tensor to host memory, then writes it). Empty when a bandwidth it needs is unknown.
    """
    links: list[tuple[str, float | None]] = []
    if kind == "host" or through_host:
        links.append(("host", host_gbps))
    if kind == "disk":
        links.append(("disk", disk_gbps))
    if not links or any(gbps is None for _, gbps in links):
        return {}
    out_ms = sum(transfer_ms(out_bytes, gbps) for _, gbps in links if gbps)
    back_ms = sum(transfer_ms(back_bytes, gbps) for _, gbps in links if gbps)
    return {
        "transfer_out_bytes": int(out_bytes),
        "transfer_back_bytes": int(back_bytes),
        "transfer_out_ms": out_ms,
        "transfer_back_ms": back_ms,
        "transfer_ms": out_ms + back_ms,
        "transfer_links": {name: gbps for name, gbps in links},
        "transfer_overlaps_compute": False,
        "transfer_overlap_note": NOT_OVERLAPPED,
    }
