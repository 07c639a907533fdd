"""How the tensors autograd saves for backward are stored: kept, compressed, or offloaded.

`saved_tensor_storage(kind)` is a `torch.autograd.graph.saved_tensors_hooks` context: every
tensor saved inside it is packed into its storage format during the forward and restored when
the backward needs it. The kinds (`memexp.plan.STORAGE_KINDS`):

* `keep`: as made (no hooks);
* `bf16`: cast to bfloat16 (2 bytes an element; relative error ≤ 2⁻⁸);
* `fp8`: float8_e4m3fn with one fp32 scale per tensor (absmax ↦ 448, e4m3's largest value):
  1 byte an element + 4;
* `int8`: one fp32 absmax scale per channel of the last dimension (absmax ↦ 127): 1 byte an
  element + 4 per channel; an element is off by at most its channel's absmax / 254;
* `host`: `torch.autograd.graph.save_on_cpu`'s semantics (pinned memory for CUDA tensors); a
  tensor already in host memory stays where it is;
* `disk`: written to a file (in `directory`, else the system's temporary folder) and mapped
  back with `torch.from_file` for the backward; the file goes when autograd lets go of the
  saved tensor (after the backward, or at exit).

Only floating tensors of at least `MIN_ELEMENTS` elements are transformed. Integer and bool
tensors (token ids, targets, indices) are exact data, not activations with a tolerance, and
are tiny. Parameters (and views of them, such as a linear layer's transposed weight) stay
alive in the model anyway, so a compressed or offloaded copy would add memory and transfers
instead of removing them. Below `MIN_ELEMENTS` a scale, a Python object or a file costs more
than the bytes it would save (LayerNorm's per-row statistics, the loss's 0-d weight).

A tensor saved by two operators (the log-softmax output, kept by log_softmax's and by
nll_loss's backward; softmax's output, kept by softmax's backward and, viewed as a batch of
matrices, by the following matmul) is packed once and shared, as autograd shares the
original: otherwise every format would store it twice.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from memexp.plan import COMPRESSED_KINDS, STORAGE_KINDS

# The fewest elements a saved tensor needs to be transformed (4 KiB in fp32).
MIN_ELEMENTS = 1024
SCALE_DTYPE = torch.float32
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
INT8_MAX = 127


@dataclass(frozen=True)
class Stored:
    """One saved tensor as its storage holds it.

    `held`: the tensors kept on the saved tensor's own device (compressed data and scales; none
    when offloaded), which is what saved-bytes counting sees. `nbytes`: the bytes as stored,
    wherever they are. `restore` rebuilds the tensor for the backward.
    """

    held: tuple[torch.Tensor, ...]
    nbytes: int
    restore: Callable[[], torch.Tensor]

    def reshaped(self, size: torch.Size) -> Stored:
        """The same stored bytes restored as another view of the whole storage."""
        return Stored(self.held, self.nbytes, lambda: self.restore().reshape(size))


# A format packs one eligible tensor; None leaves that tensor as it is.
Format = Callable[[torch.Tensor], Stored | None]


@dataclass
class StorageLedger:
    """What storage contexts packed and restored: counts, bytes and host-side seconds.

    `contexts`: storage contexts entered (one per forward), so per-step figures are totals over
    it. `source_bytes`: bytes of the tensors transformed, as made; `stored_bytes`: as stored
    (written to host memory or disk when offloading); `restored_bytes`: read back in backward.
    Seconds are the host's: CUDA copies are asynchronous, so on a GPU they are launch times.
    """

    contexts: int = 0
    tensors: int = 0
    source_bytes: int = 0
    stored_bytes: int = 0
    restored_bytes: int = 0
    pack_s: float = 0.0
    unpack_s: float = 0.0

    def per_context(self) -> dict[str, float]:
        """Each total divided by the contexts entered: one forward's (and its backward's) share."""
        count = max(self.contexts, 1)
        return {
            "tensors": self.tensors / count,
            "source_bytes": self.source_bytes / count,
            "stored_bytes": self.stored_bytes / count,
            "restored_bytes": self.restored_bytes / count,
            "pack_ms": 1e3 * self.pack_s / count,
            "unpack_ms": 1e3 * self.unpack_s / count,
        }


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# --- compressed formats ----------------------------------------------------------------------


def to_bf16(tensor: torch.Tensor) -> Stored | None:
    """bfloat16: 8 significant bits, so each element is off by at most 2⁻⁸ of itself."""
    if tensor.element_size() <= 2:
        return None  # already as small
    dtype = tensor.dtype
    data = tensor.detach().to(torch.bfloat16)
    return Stored((data,), _nbytes(data), lambda: data.to(dtype))


def to_fp8(tensor: torch.Tensor) -> Stored | None:
    """e4m3 with one scale per tensor, mapping its absmax to e4m3's largest value (448)."""
    dtype = tensor.dtype
    source = tensor.detach()
    scale = (source.abs().amax().to(SCALE_DTYPE) / FP8_MAX).clamp_min(torch.finfo(SCALE_DTYPE).tiny)
    data = (source.to(SCALE_DTYPE) / scale).to(FP8_DTYPE)

    def restore() -> torch.Tensor:
        return (data.to(SCALE_DTYPE) * scale).to(dtype)

    return Stored((data, scale), _nbytes(data) + _nbytes(scale), restore)


def to_int8(tensor: torch.Tensor) -> Stored | None:
    """int8 with one scale per channel of the last dimension (its absmax over every other
    dimension ↦ 127): an outlier channel costs only its own precision."""
    dtype = tensor.dtype
    source = tensor.detach()
    other_dims = tuple(range(source.dim() - 1))
    absmax = source.abs().amax(dim=other_dims) if other_dims else source.abs()
    scale = (absmax.to(SCALE_DTYPE) / INT8_MAX).clamp_min(torch.finfo(SCALE_DTYPE).tiny)
    scaled = source.to(SCALE_DTYPE) / scale
    data = scaled.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    del scaled

    def restore() -> torch.Tensor:
        return (data.to(SCALE_DTYPE) * scale).to(dtype)

    return Stored((data, scale), _nbytes(data) + _nbytes(scale), restore)


# --- offloading formats ----------------------------------------------------------------------


def to_host(tensor: torch.Tensor) -> Stored | None:
    """`save_on_cpu`: a copy in host memory (pinned for CUDA tensors, so copies can overlap),
    copied back to the tensor's device for the backward."""
    if tensor.device.type == "cpu":
        return None  # already in host memory
    device, pin = tensor.device, tensor.device.type == "cuda"
    copy = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=pin)
    copy.copy_(tensor)  # on the compute stream, as save_on_cpu copies
    return Stored((), _nbytes(copy), lambda: copy.to(device, non_blocking=pin))


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor, or a copy without gaps where it is a view into a larger storage (a head of a
    fused qkv): dense in the same dimension order where it can be (a transposed view), else
    contiguous. Either way its bytes are exactly numel × element size: what a file holds."""
    source = tensor.detach()
    if source.is_contiguous():
        return source
    return source.clone(memory_format=torch.preserve_format)


@dataclass(frozen=True)
class ToDisk:
    """A file per saved tensor, its bytes in the tensor's own memory layout; read back through a
    memory map (`torch.from_file`) into a tensor of the same strides on the tensor's device."""

    directory: Path | None = None

    def __call__(self, tensor: torch.Tensor) -> Stored | None:
        source = _dense(tensor)
        size, stride, dtype, device = source.size(), source.stride(), source.dtype, source.device
        flat = source.as_strided((source.numel(),), (1,)).cpu()
        nbytes = _nbytes(flat)
        handle, path = tempfile.mkstemp(prefix="memexp-saved-", suffix=".bin", dir=self.directory)
        with os.fdopen(handle, "wb") as file:
            file.write(flat.view(torch.uint8).numpy().tobytes())

        def restore() -> torch.Tensor:
            mapped = torch.from_file(path, shared=False, size=nbytes, dtype=torch.uint8)
            restored = torch.empty_strided(size, stride, dtype=dtype, device=device)
            restored.as_strided((restored.numel(),), (1,)).copy_(mapped.view(dtype))
            return restored

        stored = Stored((), nbytes, restore)
        weakref.finalize(stored, _remove, path)  # when autograd drops it, or at exit
        return stored


FORMATS: Mapping[str, Format] = {
    "bf16": to_bf16,
    "fp8": to_fp8,
    "int8": to_int8,
    "host": to_host,
    "disk": ToDisk(),
}


# --- formats on fake tensors ----------------------------------------------------------------

# Stands for host memory on fake tensors: offloaded tensors are tracked there, apart.
IMAGINED_HOST = torch.device("meta")


def to_imagined_host(tensor: torch.Tensor) -> Stored:
    """`save_on_cpu` as a GPU sees it, on fake tensors: the saved tensor moves to host memory
    (IMAGINED_HOST, tracked apart from the device) and comes back for the backward."""
    device = tensor.device
    copy = tensor.detach().to(IMAGINED_HOST)
    return Stored((), _nbytes(copy), lambda: copy.to(device))


def to_imagined_disk(tensor: torch.Tensor) -> Stored:
    """A file as fake tensors see one: the bytes leave every memory, and a tensor of the shape
    and strides the file was written with is allocated again for the backward (as `ToDisk`,
    a view with gaps is first copied dense, for the moment of writing)."""
    source = _dense(tensor)
    size, stride, dtype, device = source.size(), source.stride(), source.dtype, source.device
    del source
    restore = functools.partial(torch.empty_strided, size, stride, dtype=dtype, device=device)
    return Stored((), _nbytes(tensor), restore)


def fake_tensor_formats(host_apart: bool) -> dict[str, Format]:
    """The formats of a step on fake tensors, which hold no data to round or write: compression
    runs as it would (shapes and dtypes are all it needs); disk is imagined; host memory is
    imagined apart when the tensors stand for an accelerator's (`host_apart`), and is where
    they already are otherwise."""
    formats = {**FORMATS, "disk": to_imagined_disk}
    if host_apart:
        formats["host"] = to_imagined_host
    return formats


def stored_bytes(kind: str, shape: tuple[int, ...], element_size: int = 4) -> int:
    """The bytes `kind` stores for one eligible tensor of `shape`: each format's formula."""
    numel = 1
    for extent in shape:
        numel *= extent
    scale = torch.tensor([], dtype=SCALE_DTYPE).element_size()
    formulas = {
        "keep": numel * element_size,
        "bf16": numel * min(element_size, 2),
        "fp8": numel + scale,
        "int8": numel + scale * (shape[-1] if shape else 1),
        "host": numel * element_size,
        "disk": numel * element_size,
    }
    return formulas[kind]


# --- the hooks -------------------------------------------------------------------------------


def _is_parameter(tensor: torch.Tensor) -> bool:
    """A leaf that requires grad (a parameter), or a view of one."""
    base = tensor._base if tensor._base is not None else tensor
    return base.is_leaf and base.requires_grad


def eligible(tensor: torch.Tensor) -> bool:
    """Transformed by a storage: floating, at least MIN_ELEMENTS, not a parameter (see above)."""
    return (
        tensor.is_floating_point() and tensor.numel() >= MIN_ELEMENTS and not _is_parameter(tensor)
    )


class SavedTensorStorage:
    """The pack and unpack hooks of one storage format, sharing one packed copy per tensor."""

    def __init__(self, kind: str, pack_one: Format, ledger: StorageLedger | None = None) -> None:
        self.kind = kind
        self.pack_one = pack_one
        self.ledger = ledger if ledger is not None else StorageLedger()
        self._packed: dict[tuple[Any, ...], Stored] = {}

    @classmethod
    def of(
        cls,
        kind: str,
        *,
        directory: Path | None = None,
        formats: Mapping[str, Format] = FORMATS,
        ledger: StorageLedger | None = None,
    ) -> SavedTensorStorage:
        if kind not in STORAGE_KINDS or kind == "keep":
            raise ValueError(f"no storage format {kind!r}; formats: {', '.join(FORMATS)}")
        pack_one = ToDisk(directory) if kind == "disk" and directory else formats[kind]
        return cls(kind, pack_one, ledger)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | Stored:
        if not eligible(tensor):
            return tensor
        key = self._key(tensor)
        if key in self._packed:
            return self._packed[key].reshaped(tensor.size())
        start = time.perf_counter()
        stored = self.pack_one(tensor)
        self.ledger.pack_s += time.perf_counter() - start
        if stored is None:
            return tensor
        self.ledger.tensors += 1
        self.ledger.source_bytes += _nbytes(tensor)
        self.ledger.stored_bytes += stored.nbytes
        self._packed[key] = stored
        return stored

    @staticmethod
    def _key(tensor: torch.Tensor) -> tuple[Any, ...]:
        """What makes two saved tensors one: the same bytes of the same storage, unmodified.

        A contiguous view of a whole storage is keyed by the storage alone, so its other such
        views (softmax's 4-d output and its 3-d view) share it. The storage's weak reference
        keeps its address from being reused while it is a key.
        """
        storage = tensor.untyped_storage()
        common = (StorageWeakRef(storage), tensor.dtype, tensor._version)
        whole = (
            tensor.is_contiguous()
            and tensor.storage_offset() == 0
            and _nbytes(tensor) == storage.nbytes()
        )
        if whole:
            return common
        return (*common, tensor.storage_offset(), tuple(tensor.size()), tensor.stride())

    def unpack(self, packed: torch.Tensor | Stored) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        start = time.perf_counter()
        restored = packed.restore()
        self.ledger.unpack_s += time.perf_counter() - start
        self.ledger.restored_bytes += packed.nbytes
        return restored

    @staticmethod
    def held(packed: torch.Tensor | Stored) -> tuple[torch.Tensor, ...]:
        """The tensors a packed value keeps on the saved tensor's device."""
        return (packed,) if isinstance(packed, torch.Tensor) else packed.held

    @contextlib.contextmanager
    def hooks(self) -> Iterator[StorageLedger]:
        self.ledger.contexts += 1
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield self.ledger
        finally:
            self._packed.clear()  # the graph holds what was packed; only sharing ends here


@contextlib.contextmanager
def saved_tensor_storage(
    kind: str,
    *,
    directory: Path | None = None,
    formats: Mapping[str, Format] = FORMATS,
    ledger: StorageLedger | None = None,
) -> Iterator[StorageLedger]:
    """Store every tensor saved inside the block as `kind` says; yields the ledger it adds to.

    `formats` lets a caller substitute a format (the fake device imagines host memory and disk);
    `ledger` accumulates over several blocks (a job's steps).
    """
    if kind == "keep":
        if ledger is not None:
            ledger.contexts += 1
        yield ledger if ledger is not None else StorageLedger()
        return
    storage = SavedTensorStorage.of(kind, directory=directory, formats=formats, ledger=ledger)
    with storage.hooks() as used:
        yield used


def in_place_storage(kind: str) -> SavedTensorStorage | None:
    """The part of `kind` that stays on the device: its compression, or None (kept, or
    offloaded, whose tensors are counted where they are made)."""
    return SavedTensorStorage.of(kind) if kind in COMPRESSED_KINDS else None
