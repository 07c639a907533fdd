"""Saved-tensor storage: each format's exact bytes and error bound, what passes through, and
that a plan's storage is what a step stores."""

from __future__ import annotations

import gc
import logging
import math
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from memexp import analytic
from memexp.config import ConfigError, ExperimentSpec
from memexp.devices import predicted_storage
from memexp.estimate import predict, predict_job
from memexp.measure.fidelity import gradient_error
from memexp.measure.memory import measure_memory
from memexp.measure.timing import first_step
from memexp.plan import COMPRESSED_KINDS, STORAGE_KINDS, CheckpointPlan
from memexp.results import STATUS_OK, read_result
from memexp.runner import run_job
from memexp.storage import (
    FORMATS,
    MIN_ELEMENTS,
    SavedTensorStorage,
    Stored,
    eligible,
    saved_tensor_storage,
    stored_bytes,
)
from memexp.strategies import make_plan
from memexp.training import build_workload, forward_loss

SpecFn = Callable[..., ExperimentSpec]
SHAPE = (4, 8, 96)


def activation(shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    """Values over several orders of magnitude, one outlier channel, and exact zeros."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(shape, generator=generator) * torch.logspace(-3, 1, shape[-1])
    values[..., 5] *= 1000.0
    values[0, 0, :7] = 0.0
    return values


@pytest.mark.parametrize("kind", COMPRESSED_KINDS)
def test_each_format_stores_the_bytes_of_its_formula(kind: str) -> None:
    stored = FORMATS[kind](activation())
    assert isinstance(stored, Stored)
    numel = math.prod(SHAPE)
    expected = {"bf16": 2 * numel, "fp8": numel + 4, "int8": numel + 4 * SHAPE[-1]}[kind]
    assert stored.nbytes == stored_bytes(kind, SHAPE) == expected
    assert sum(t.numel() * t.element_size() for t in stored.held) == expected


def test_bf16_is_off_by_at_most_one_half_unit_in_the_last_place() -> None:
    x = activation()
    restored = FORMATS["bf16"](x).restore()
    assert restored.dtype == x.dtype and restored.shape == x.shape
    assert torch.all((restored - x).abs() <= x.abs() * 2**-8)


def test_fp8_is_off_by_half_a_step_of_e4m3_at_its_scale() -> None:
    """e4m3 has 3 mantissa bits (relative step 2⁻³) and subnormals down to 2⁻⁹ of the scale."""
    x = activation()
    stored = FORMATS["fp8"](x)
    scale = float(stored.held[1])
    assert scale == pytest.approx(float(x.abs().max()) / 448, rel=1e-6)
    error = (stored.restore() - x).abs()
    bound = x.abs() * 2**-4 + scale * 2**-10
    assert torch.all(error <= bound * (1 + 1e-6))


def test_int8_is_off_by_at_most_its_channels_absmax_over_254() -> None:
    """The format's bound: one scale per last-dim channel, absmax ↦ 127, rounding to nearest."""
    x = activation()
    restored = FORMATS["int8"](x).restore()
    channel_absmax = x.abs().amax(dim=(0, 1))
    error = (restored - x).abs()
    assert torch.all(error <= channel_absmax / 254 * (1 + 1e-6))
    assert torch.equal(restored[0, 0, :7], torch.zeros(7))  # zeros stay exact
    # The outlier channel costs only its own precision: a quiet channel keeps its small error.
    assert float(error[..., 0].max()) < float(channel_absmax[5]) / 254 / 1e3


def test_offloading_formats_restore_every_bit_and_the_strides(tmp_path: Path) -> None:
    transposed = activation().transpose(0, 2)
    storage = SavedTensorStorage.of("disk", directory=tmp_path)
    stored = storage.pack(transposed)
    assert isinstance(stored, Stored) and stored.held == ()
    assert stored.nbytes == transposed.numel() * 4
    assert len(list(tmp_path.iterdir())) == 1
    restored = storage.unpack(stored)
    assert torch.equal(restored, transposed) and restored.stride() == transposed.stride()
    assert storage.unpack(stored).data_ptr() != restored.data_ptr()  # read again, not shared
    del stored, storage  # the graph (here: this test) and the sharing table let go
    gc.collect()
    assert list(tmp_path.iterdir()) == []  # gone once nothing can unpack it
    assert FORMATS["host"](activation()) is None  # on the CPU a tensor is in host memory already


def test_integers_small_tensors_and_parameters_pass_through() -> None:
    layer = nn.Linear(64, 64)
    passing = {
        "token ids": torch.randint(10, (4, 512)),
        "mask": torch.ones(4, 512, dtype=torch.bool),
        "small": torch.randn(MIN_ELEMENTS - 1),
        "parameter": layer.weight,
        "parameter view": layer.weight.t(),
    }
    for kind in (*COMPRESSED_KINDS, "disk"):
        storage = SavedTensorStorage.of(kind)
        for name, tensor in passing.items():
            assert not eligible(tensor), name
            assert storage.pack(tensor) is tensor, (kind, name)
    assert eligible(torch.randn(MIN_ELEMENTS))


def test_a_tensor_saved_twice_is_stored_once() -> None:
    storage = SavedTensorStorage.of("int8")
    x = activation()
    first, again, view = storage.pack(x), storage.pack(x), storage.pack(x.view(-1, SHAPE[-1]))
    assert first.held == again.held == view.held
    assert storage.ledger.tensors == 1
    assert storage.unpack(view).shape == (SHAPE[0] * SHAPE[1], SHAPE[-1])


def test_plans_carry_a_storage_and_read_records_from_before_it() -> None:
    plan = CheckpointPlan(2, segments=((0, 2),), storage="int8")
    assert CheckpointPlan.from_dict(plan.to_dict()) == plan
    assert CheckpointPlan.from_dict({"num_layers": 2, "offload": True}).storage == "host"
    assert CheckpointPlan.from_dict({"num_layers": 2, "offload": False}).storage == "keep"
    assert "int8" in plan.describe()
    with pytest.raises(ValueError, match="unknown storage"):
        CheckpointPlan(2, storage="fp4")
    assert set(FORMATS) == set(STORAGE_KINDS) - {"keep"}


def saved_storages(spec: ExperimentSpec) -> list[tuple[int, tuple[int, ...], bool]]:
    """(bytes, shape first saved as, eligible) of each distinct non-parameter storage the
    forward saves, with nothing transformed."""
    work = build_workload(spec, CheckpointPlan.nothing(spec.model.layers), "cpu")
    parameters = {StorageWeakRef(p.untyped_storage()) for p in work.model.parameters()}
    found: dict[StorageWeakRef, tuple[int, tuple[int, ...], bool]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        ref = StorageWeakRef(tensor.untyped_storage())
        if ref not in parameters and ref not in found:
            nbytes = tensor.untyped_storage().nbytes()
            found[ref] = (nbytes, tuple(tensor.shape), eligible(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward_loss(work, in_place=True)
    return list(found.values())


@pytest.mark.parametrize("kind", COMPRESSED_KINDS)
def test_a_compressed_step_saves_the_bytes_of_the_formula(kind: str, tiny_spec: SpecFn) -> None:
    """Counted as a job counts (its first step): every eligible storage at its format's bytes,
    the rest (ids, targets, norm statistics) as made."""
    spec = tiny_spec()
    expected = sum(
        stored_bytes(kind, shape) if is_eligible else nbytes
        for nbytes, shape, is_eligible in saved_storages(spec)
    )
    plan = CheckpointPlan(spec.model.layers, storage=kind)
    assert first_step(build_workload(spec, plan, "cpu"))[1] == expected
    kept = first_step(build_workload(spec, CheckpointPlan.nothing(spec.model.layers), "cpu"))[1]
    assert expected < {"bf16": 0.55, "fp8": 0.3, "int8": 0.3}[kind] * kept


@pytest.mark.slow
def test_disk_offload_writes_and_reads_each_saved_tensor_once(
    tiny_spec: SpecFn, tmp_path: Path
) -> None:
    spec = tiny_spec()
    eligible_bytes = sum(n for n, _, is_eligible in saved_storages(spec) if is_eligible)
    work = build_workload(spec, CheckpointPlan(spec.model.layers, storage="disk"), "cpu")
    with saved_tensor_storage("disk", directory=tmp_path) as ledger:
        loss = forward_loss(work, in_place=True)
    assert ledger.stored_bytes == ledger.source_bytes == eligible_bytes
    assert sum(path.stat().st_size for path in tmp_path.iterdir()) == eligible_bytes
    loss.backward()
    assert ledger.restored_bytes >= eligible_bytes  # tensors saved as two views read twice
    del loss
    gc.collect()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_offloading_to_disk_takes_its_bytes_off_the_tracked_device(tiny_spec: SpecFn) -> None:
    """At the forward's last op every offloaded tensor is gone from the CPU's tracked memory,
    but the log-probabilities, which cross_entropy still holds there (b·s·V fp32)."""
    spec = tiny_spec("optimizer.name=sgd")
    log_probabilities = spec.batch_size * spec.seq_len * spec.model.vocab_size * 4
    end_of_forward, stored = {}, {}
    for kind in ("keep", "disk", "int8"):
        work = build_workload(spec, CheckpointPlan(spec.model.layers, storage=kind), "cpu")
        timeline = measure_memory(work).timeline
        end_of_forward[kind] = [total for _, total, phase in timeline if phase == "forward"][-1]
        stored[kind] = work.storage_ledger.stored_bytes
        source = work.storage_ledger.source_bytes
    assert end_of_forward["keep"] - end_of_forward["disk"] == source - log_probabilities
    assert end_of_forward["keep"] - end_of_forward["int8"] == (
        source - stored["int8"] - log_probabilities
    )


def test_a_lossy_storage_changes_the_gradients_not_the_loss(tiny_spec: SpecFn) -> None:
    spec = tiny_spec()
    errors = {
        kind: gradient_error(spec, CheckpointPlan(spec.model.layers, storage=kind))
        for kind in (*COMPRESSED_KINDS, "disk")
    }
    assert all(error.loss == error.reference_loss for error in errors.values())
    assert errors["disk"].relative_error == errors["disk"].worst_relative_error == 0.0
    for kind in COMPRESSED_KINDS:
        assert 0 < errors[kind].relative_error <= errors[kind].worst_relative_error < 0.1
    assert errors["bf16"].relative_error < errors["int8"].relative_error
    assert errors["int8"].relative_error < errors["fp8"].relative_error


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("strategy=compress", "strategy.dtype=fp4"), "strategy.dtype='fp4'"),
        (("strategy=compress", "strategy.base=adaptive"), "strategy.base='adaptive'"),
        (("strategy=offload", "strategy.to=tape"), "strategy.to='tape'"),
        (("device=fake", "device.host_gbps=0"), "device.host_gbps=0"),
    ],
)
def test_storage_settings_are_checked(
    overrides: tuple[str, ...], message: str, tiny_spec: SpecFn
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny_spec(*overrides)


def test_compress_stores_its_base_plan_compressed(tiny_spec: SpecFn) -> None:
    for base in ("none", "full", "sqrt", "selective"):
        spec = tiny_spec("strategy=compress", "strategy.dtype=fp8", f"strategy.base={base}")
        plan = make_plan(spec)
        assert plan == replace(make_plan(tiny_spec(f"strategy={base}")), storage="fp8")
    assert make_plan(tiny_spec("strategy=offload", "strategy.to=disk")).storage == "disk"


@pytest.mark.slow
def test_the_fake_device_predicts_offloading_transfers_from_its_bandwidths(
    tiny_spec: SpecFn,
) -> None:
    """bytes / bandwidth each way: out what the forward stored, back what the backward read."""
    spec = tiny_spec("device=fake", "device.host_gbps=50", "device.disk_gbps=5")
    plan = CheckpointPlan(spec.model.layers, storage="disk")
    prediction = predict_job(spec, plan)
    figures = predicted_storage(spec, plan, prediction, {})
    out, back = prediction.storage.stored_bytes, prediction.storage.restored_bytes
    assert figures["storage_transfer_out_bytes"] == out == 319488  # tiny's eligible bytes
    assert figures["storage_transfer_out_ms"] == pytest.approx(out / 50e6 + out / 5e6)
    assert figures["storage_transfer_back_ms"] == pytest.approx(back / 50e6 + back / 5e6)
    assert figures["storage_transfer_overlaps_compute"] is False
    assert figures["storage_transfer_source"] == "closed form from fake-tensor bytes"


@pytest.mark.slow
def test_int8_keeps_at_most_35_percent_of_nones_saved_bytes_on_small(tiny_spec: SpecFn) -> None:
    """Counted on fake tensors, which count exactly what the CPU counts (the compressed data
    and scales; the rest as made)."""
    spec = tiny_spec("model=small")
    layers = spec.model.layers
    saved = {
        kind: predict(spec, CheckpointPlan(layers, storage=kind), "cpu").saved_activation_bytes
        for kind in ("keep", "int8")
    }
    assert saved["int8"] <= 0.35 * saved["keep"]


def test_compression_has_no_closed_form_and_offloading_keeps_it(tiny_spec: SpecFn) -> None:
    spec = tiny_spec()
    kept = analytic.saved_activation_bytes(spec, CheckpointPlan.nothing(spec.model.layers))
    for kind in ("host", "disk"):
        plan = CheckpointPlan(spec.model.layers, storage=kind)
        assert analytic.saved_activation_bytes(spec, plan) == kept
    with pytest.raises(ConfigError, match=re.escape("plan.storage='int8'")):
        analytic.saved_activation_bytes(spec, CheckpointPlan(spec.model.layers, storage="int8"))


@pytest.mark.slow
def test_storage_jobs_record_and_print_what_their_storage_did(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Disk offload measured on the CPU; int8 with its gradient error; a fake-device disk
    offload with its transfer time, units and source."""
    jobs = {
        "disk": ("strategy=offload", "strategy.to=disk", "device=cpu", "measure.repeat=1"),
        "int8": ("strategy=compress", "device=cpu", "measure.repeat=1"),
        "predicted": ("strategy=offload", "strategy.to=disk", "device=fake"),
    }
    caplog.set_level(logging.INFO, logger="memexp")
    records = {}
    for name, overrides in jobs.items():
        run_job(tiny_cfg(*overrides), tmp_path / name, {})
        records[name] = read_result(tmp_path / name)
    printed = caplog.text
    assert all(record.status == STATUS_OK for record in records.values())
    disk, int8, predicted = (records[name].extra for name in jobs)
    assert disk["storage_stored_bytes"] == disk["storage_source_bytes"] == 319488
    assert disk["storage_pack_ms"] > 0 and disk["storage_unpack_ms"] > 0
    assert int8["storage_stored_bytes"] == 88064  # tiny's eligible tensors as int8 + scales
    assert int8["storage_loss"] == int8["storage_reference_loss"] == records["int8"].loss_first_step
    assert 0 < int8["storage_grad_rel_error"] <= int8["storage_grad_rel_error_worst"]
    assert predicted["storage_transfer_out_bytes"] == 319488
    assert "storage_pack_ms" not in predicted  # nothing ran
    assert "host 55 GB/s then disk 7 GB/s (closed form from fake-tensor bytes" in printed
    assert "gradient error" in printed
