"""Per-unit choices: a plan recomputes each unit kept, whole or element-wise, as data the model
executes; the roofline prices every operator; measured costs come from the job's device.

The plans of every existing strategy are special cases: `op` is every layer recomputed
element-wise, and adaptive's plan of that choice computes, saves and peaks exactly as op's.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from memexp import planner
from memexp.config import ConfigError, ExperimentSpec
from memexp.measure.fidelity import gradient_error
from memexp.measure.flops import RooflineClock, flop_counter, step_flops
from memexp.measure.memory import measure_memory
from memexp.measure.timing import spread
from memexp.model import Stored
from memexp.plan import LAYER, CheckpointPlan, Part
from memexp.planner import cheapest_within, predict
from memexp.results import SCOPE_FORWARD_BACKWARD
from memexp.strategies import adaptive, make_plan
from memexp.training import backward, build_model, build_workload, forward_loss, train_step

SpecFn = Callable[..., ExperimentSpec]
EW = planner.ELEMENTWISE


def loss_and_grads(spec: ExperimentSpec, plan: CheckpointPlan) -> list[torch.Tensor]:
    work = build_workload(spec, plan, "cpu")
    loss = forward_loss(work)
    backward(loss)
    return [loss.detach(), *(p.grad for p in work.model.parameters())]


def test_a_plan_with_selective_units_round_trips_and_reads_as_a_line() -> None:
    plan = CheckpointPlan(
        5,
        segments=((3, 4),),
        parts=((0, Part.ATTENTION_CORE),),
        selective=((0, "ffn", EW), (1, "attention", EW), (2, LAYER, EW)),
        stored=((0, "int8"), (1, "disk")),
        stored_units=((4, "attention", "bf16"),),
    )
    assert CheckpointPlan.from_dict(plan.to_dict()) == plan
    assert plan.selective_of(0) == {"ffn": EW}
    assert plan.uses_op_policy and plan.recomputes_anything
    assert plan.describe() == (
        "layers 3 each recomputed as its own checkpoint; attention_core recomputed in layers 0; "
        "ffn recomputed element-wise (save_matmuls) in layers 0; attention recomputed "
        "element-wise (save_matmuls) in layers 1; layer recomputed element-wise (save_matmuls) "
        "in layers 2; in layers 0 int8 storage; in layers 1 disk storage; in layers 4 attention in "
        "bf16 storage"
    )
    assert plan.storage_of(1) == "disk" and plan.storage_of(2) is None
    assert plan.units_stored_in(4) == {"attention": "bf16"} and plan.units_stored_in(0) == {}
    assert plan.storage_kinds == {"keep", "int8", "disk", "bf16"}
    # a record written before plans had units recomputed element-wise still reads
    old = {
        k: v for k, v in plan.to_dict().items() if k not in ("selective", "stored", "stored_units")
    }
    assert CheckpointPlan.from_dict(old).selective == CheckpointPlan.from_dict(old).stored == ()
    assert CheckpointPlan.from_dict(old).stored_units == ()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"selective": ((0, "ffn", EW),), "parts": ((0, Part.FFN),)}, "recomputed two ways"),
        ({"selective": ((0, "attention", EW), (0, "attention_core", EW))}, "contains"),
        ({"selective": ((0, LAYER, EW), (0, "ffn", EW))}, "whole layer already contains"),
        ({"selective": ((0, "ffn", EW),), "segments": ((0, 2),)}, "inside a segment"),
        ({"selective": ((0, "ffn", "save_everything"),)}, "op policy"),
        ({"selective": ((0, "head", EW),)}, "not one of"),
        ({"selective": ((5, "ffn", EW),)}, "outside the model"),
        ({"stored": ((0, "int4"),)}, "unknown storage"),
        ({"stored": ((0, "int8"), (0, "disk"))}, "named twice"),
        ({"stored": ((0, "int8"),), "segments": ((0, 1),)}, "recomputed whole and stored"),
        ({"stored": ((0, "int8"),), "selective": ((0, LAYER, EW),)}, "recomputed whole"),
        ({"stored_units": ((0, "core", "int8"),)}, "not one of"),
        ({"stored_units": ((0, "ffn", "int4"),)}, "unknown storage"),
        ({"stored_units": ((0, "ffn", "int8"), (0, "ffn", "disk"))}, "named twice"),
        ({"stored_units": ((0, "ffn", "int8"),), "stored": ((0, "disk"),)}, "stored whole"),
        ({"stored_units": ((0, "ffn", "int8"),), "parts": ((0, Part.FFN),)}, "recomputed and"),
        ({"stored_units": ((0, "ffn", "int8"),), "selective": ((0, "ffn", EW),)}, "recomputed"),
        ({"stored_units": ((0, "attention", "int8"),), "segments": ((0, 1),)}, "recomputed"),
        (
            {"stored_units": ((0, "attention_core", "int8"),), "parts": ((0, Part.ATTENTION),)},
            "rec",
        ),
    ],
)
def test_overlapping_or_unknown_selective_units_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CheckpointPlan(4, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_any_mix_of_options_computes_what_none_computes(precision: str, tiny_spec: SpecFn) -> None:
    """Bit-identical loss and gradients for mixed plans over all 17 options per layer."""
    spec = tiny_spec(f"precision={precision}")
    expected = loss_and_grads(spec, CheckpointPlan.nothing(spec.model.layers))
    rng = random.Random(0)
    layers = spec.model.layers
    plans = [planner.OPTIONS[i : i + layers] for i in range(0, len(planner.OPTIONS), layers)]
    plans += [tuple(rng.choice(planner.OPTIONS) for _ in range(layers)) for _ in range(2)]
    for choices in plans:
        choices = (*choices, *((),) * (layers - len(choices)))
        got = loss_and_grads(spec, planner.plan_of(choices))
        assert all(map(torch.equal, got, expected)), choices


@pytest.mark.slow
def test_op_is_every_layer_recomputed_element_wise(tiny_spec: SpecFn) -> None:
    """The same FLOPs and the same tracked peak as op's own plan."""
    spec = tiny_spec("strategy=op")
    op_plan = make_plan(spec)
    layer = (planner.unit_token(LAYER, EW),)
    as_units = planner.plan_of((layer,) * spec.model.layers)
    assert as_units.selective == tuple((i, LAYER, EW) for i in range(spec.model.layers))
    assert step_flops(spec, as_units) == step_flops(spec, op_plan)

    def peak(plan: CheckpointPlan) -> int:
        return measure_memory(build_workload(spec, plan, "cpu")).peak_bytes

    assert peak(as_units) == peak(op_plan)


def test_roofline_prices_each_operator_by_its_flops_or_its_bytes() -> None:
    """At 1 TFLOP/s and 1000 GB/s one FLOP and one byte each take a picosecond."""
    with FakeTensorMode():
        a, b = torch.randn(64, 32), torch.randn(32, 16)
        with flop_counter() as counter, RooflineClock(counter, 1.0, 1000.0) as clock:
            product = a @ b  # 2·64·32·16 FLOPs; (64·32 + 32·16 + 64·16)·4 bytes
        assert clock.picoseconds == 2 * 64 * 32 * 16
        with flop_counter() as counter, RooflineClock(counter, 1.0, 1000.0) as clock:
            F.gelu(product)  # no FLOPs counted: 64·16 floats read and written
            product.t()  # a view moves nothing
        assert clock.picoseconds == 2 * 64 * 16 * 4
        with flop_counter() as counter, RooflineClock(counter, 1000.0, 1.0) as clock:
            a @ b  # memory-bound at 1 GB/s: a thousandth of a byte per picosecond
        assert clock.picoseconds == (64 * 32 + 32 * 16 + 64 * 16) * 4 * 1000


def test_the_roofline_uses_the_devices_rates_or_the_imagined_devices(tiny_spec: SpecFn) -> None:
    assert tiny_spec("device=fake").roofline_rates == (989.0, 4800.0)
    assert tiny_spec("device=fake", "device.imagine=cpu").roofline_rates == (2.0, 200.0)
    given = tiny_spec("device=fake", "device.peak_tflops=100", "device.memory_gbps=1000")
    assert given.roofline_rates == (100.0, 1000.0)


def test_a_unit_stored_on_its_own_is_timed_in_its_storage(tiny_spec: SpecFn) -> None:
    """Measured costs run one layer under each option's units: a unit stored its own way runs
    in that storage. int8 rounds what the attention block saves, so its input's gradient moves;
    offloaded to host memory it comes back unchanged, bit for bit; the output is the same."""
    spec = tiny_spec()
    torch.manual_seed(0)
    layer = build_model(spec.model).layers[0]
    x = torch.randn(spec.batch_size, spec.seq_len, spec.model.hidden, requires_grad=True)
    runs = {}
    for option in [(), ("saved:int8@attention",), ("attention_core", "saved:host@attention")]:
        units = planner.option_units(option)
        if option:
            assert isinstance(units["attention"], Stored)
        out = layer(x, units)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        runs[option] = (out.detach(), grad)
    kept, int8, host = runs.values()
    assert all(torch.equal(kept[0], run[0]) for run in (int8, host))
    assert not torch.equal(kept[1], int8[1]) and torch.equal(kept[1], host[1])


@pytest.mark.slow
def test_measured_costs_come_from_the_jobs_device(tiny_spec: SpecFn) -> None:
    """Timed, so only what timing cannot change is asserted: the source, and that keeping
    everything costs nothing."""
    spec = tiny_spec("seq.len=8")
    profile = planner.profile_step(spec)
    measured = planner.with_measured_costs(profile, spec)
    assert profile.cost_source.startswith(planner.COST_ROOFLINE)
    assert measured.cost_source.startswith(planner.COST_MEASURED)
    assert measured.cost(()) == 0
    assert all(measured.cost(option) >= 0 for option in planner.OPTIONS)
    assert {o: s.kept_bytes for o, s in measured.options.items()} == {
        o: s.kept_bytes for o, s in profile.options.items()
    }


def test_a_measured_difference_inside_the_noise_is_priced_on_the_scaled_roofline(
    tiny_spec: SpecFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole layer measures 10 ms above `nothing`, clear of both spreads: measured. Every
    other option differs from `nothing` by less than its spread: its roofline price, times the
    whole layer's measured / roofline ratio, never 0 for noise. With nothing resolved, the
    roofline stays."""
    spec = tiny_spec("model.layers=3", "seq.len=64", "model.vocab_size=64")  # test_adaptive's
    profile = planner.profile_step(spec)
    layer = (LAYER,)
    noisy = spread([9.0, 10.5, 10.0, 9.5, 11.0])  # median 10 ms, IQR 1 ms
    steady = spread([10.0] * 5)

    def timed(*layer_ms: float) -> Callable[..., dict]:
        return lambda spec, ways, repeats: {
            option: spread(list(layer_ms)) if option == layer else (steady if not option else noisy)
            for option in ways
        }

    monkeypatch.setattr(planner, "time_layer_steps", timed(20.0, 20.0, 20.0, 20.0, 20.0))
    measured = planner.with_measured_costs(profile, spec)
    scale = 10 * 10**9 / profile.cost(layer)
    assert measured.cost(layer) == 10 * 10**9
    assert measured.cost(("ffn",)) == round(profile.cost(("ffn",)) * scale) > 0
    assert measured.cost(()) == 0
    assert f"1 of {len(profile.options) - 1} options above the timing noise" in measured.cost_source
    monkeypatch.setattr(planner, "time_layer_steps", timed(10.0, 10.1, 9.9, 10.3, 9.7))
    unresolved = planner.with_measured_costs(profile, spec)
    assert {o: unresolved.cost(o) for o in profile.options} == {
        o: profile.cost(o) for o in profile.options
    }
    assert "no option's difference was larger than the timing noise" in unresolved.cost_source


def test_on_the_fake_device_the_documented_error_bounds_stand_in(tiny_spec: SpecFn) -> None:
    everything = ["bf16", "fp8", "int8", "host", "disk"]
    spec = tiny_spec("device=fake")
    config = adaptive.AdaptiveConfig(storage=everything)
    assert adaptive.offered_storage(config, spec).kinds == tuple(everything)
    config.max_grad_rel_error = 0.01  # fp8's 2⁻⁴ is above it
    offer = adaptive.offered_storage(config, spec)
    assert offer.kinds == ("bf16", "int8", "host", "disk")
    assert offer.errors == {"bf16": 2.0**-8, "fp8": 2.0**-4, "int8": 1 / 254}
    assert offer.basis == adaptive.ERROR_DOCUMENTED
    config.max_grad_rel_error = 0.0  # lossless only
    assert adaptive.offered_storage(config, spec).kinds == ("host", "disk")


@pytest.mark.slow
def test_on_a_device_that_runs_the_gradient_error_is_measured(tiny_spec: SpecFn) -> None:
    """Each lossy kind's error is that of a step with every layer stored that way, against the
    step with nothing stored: bf16 (8 significant bits) errs less than fp8 (4), and a bound
    between the two offers bf16 and not fp8."""
    spec = tiny_spec(*("model.layers=2", "seq.len=64", "model.vocab_size=64"))
    config = adaptive.AdaptiveConfig(storage=["bf16", "fp8", "disk"], max_grad_rel_error=1.0)
    offer = adaptive.offered_storage(config, spec)
    assert offer.basis == adaptive.ERROR_MEASURED and offer.kinds == ("bf16", "fp8", "disk")
    assert 0 < offer.errors["bf16"] < offer.errors["fp8"]
    stored = CheckpointPlan(2, stored=((0, "fp8"), (1, "fp8")))
    assert offer.errors["fp8"] == gradient_error(spec, stored).relative_error
    config.max_grad_rel_error = (offer.errors["bf16"] + offer.errors["fp8"]) / 2
    assert adaptive.offered_storage(config, spec).kinds == ("bf16", "disk")


def test_storage_kinds_must_be_known(tiny_spec: SpecFn) -> None:
    with pytest.raises(ConfigError, match=r"strategy\.storage"):
        tiny_spec("strategy=adaptive", "strategy.storage=[int4]")


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, first",
    [
        # the first layer's input, the embeddings' output, is freed as it is stored elsewhere
        ("int8", ("saved:int8",)),
        # the core's inputs are views into the fused qkv, written to disk as dense copies
        ("disk", ("attention_core", "saved:disk")),
        # one unit stored, the rest kept
        ("int8", ("saved:int8@attention",)),
        ("bf16", ("ffn", "saved:bf16@attention_core")),
        ("disk", ("attention_core", "saved:disk@attention")),
        ("host", ("attention", "saved:host@ffn")),
    ],
    ids=[
        "first-layer-int8",
        "core-recomputed-on-disk",
        "attention-int8",
        "ffn-recomputed-core-bf16",
        "core-recomputed-attention-on-disk",
        "attention-recomputed-ffn-on-host",
    ],
)
def test_a_stored_plan_measures_as_predicted_wherever_it_stands(
    tiny_spec: SpecFn, kind: str, first: tuple[str, ...]
) -> None:
    """A layer's option is profiled in the middle of a stack on fake tensors; on the CPU it
    measures the same as the first or last layer, to the byte."""
    spec = tiny_spec("model.layers=2", "seq.len=64", "model.vocab_size=64")
    profile = planner.profile_step(spec, (kind,))
    for choices in [(first, ()), ((), first), (first, first)]:
        work = build_workload(spec, planner.plan_of(choices), "cpu")
        train_step(work)
        measured = measure_memory(work)
        predicted = predict(profile, choices)
        assert measured.forward_backward_peak_bytes == predicted.forward_backward_peak_bytes
        assert measured.peak_bytes == predicted.peak_bytes, choices


@pytest.mark.slow
def test_solver_matches_exhaustive_search_with_storage_choices(tiny_spec: SpecFn) -> None:
    """Over 17 recompute options, and as int8 or on disk the 15 that save tensors stored whole,
    the 3 that keep the attention core, the 9 that keep the attention block and the 5 that keep
    the FFN block with that unit stored (81 per layer, 6,561 plans on 2 layers), on a ladder of
    budgets: the solver's cost is the least of the plans that fit, its plans' predicted peaks
    measure on the CPU to the byte, and offloading to disk costs its transfers at
    device.disk_gbps."""
    spec = tiny_spec("model.layers=2", "seq.len=64", "model.vocab_size=64", "device.disk_gbps=2")
    profile = planner.profile_step(spec, ("int8", "disk"))
    assert len(profile.options) == 17 + 2 * (15 + 3 + 9 + 5)
    assert profile.cost_source.endswith("disk 2 GB/s")
    on_disk = ("ffn", planner.storage_token("disk"))
    away = profile.options[("ffn",)].held_bytes - profile.options[on_disk].held_bytes
    assert away > 0
    every_plan = {
        choices: predict(profile, choices)
        for choices in itertools.product(profile.options, repeat=profile.layers)
    }
    peaks = sorted({p.peak_in(SCOPE_FORWARD_BACKWARD) for p in every_plan.values()})
    chosen = set()
    for budget in peaks:
        fitting = [
            p.recompute_ps
            for p in every_plan.values()
            if p.peak_in(SCOPE_FORWARD_BACKWARD) <= budget
        ]
        solution = cheapest_within(profile, budget, SCOPE_FORWARD_BACKWARD)
        assert solution is not None and solution.recompute_ps == min(fitting)
        chosen.add(solution.choices)
    stored = [c for c in chosen if any(planner.STORAGE_MARK in t for o in c for t in o)]
    assert stored, "some budget is met most cheaply by storing"
    units = [c for c in stored if planner.plan_of(c).stored_units]
    assert units, "some budget is met most cheaply by storing one unit on its own"
    for choices in sorted(stored):
        work = build_workload(spec, planner.plan_of(choices), "cpu")
        train_step(work)
        measured = measure_memory(work).forward_backward_peak_bytes
        assert measured == every_plan[choices].peak_in(SCOPE_FORWARD_BACKWARD), choices


@pytest.mark.slow
def test_solver_matches_exhaustive_search_on_three_layers_with_storage_per_unit(
    tiny_spec: SpecFn,
) -> None:
    """On 3 layers over the 17 recompute options and the 2 × 32 that store as int8 or on disk
    the whole layer or one unit (531,441 plans): at every budget where the cheapest fitting
    plan changes, and at 100 more spread over the plans' peaks, the solver's cost is the least
    of the plans that fit. Some of those cheapest plans store one unit alone, and they measure
    on the CPU as predicted, to the byte."""
    spec = tiny_spec("model.layers=3", "seq.len=64", "model.vocab_size=64")
    profile = planner.profile_step(spec, ("int8", "disk"))
    assert len(profile.options) == 17 + 2 * (15 + 3 + 9 + 5)
    every_plan = sorted(
        (p.peak_in(SCOPE_FORWARD_BACKWARD), p.recompute_ps, choices)
        for choices in itertools.product(profile.options, repeat=profile.layers)
        for p in [predict(profile, choices)]
    )
    peaks = [peak for peak, _, _ in every_plan]
    least = list(itertools.accumulate((cost for _, cost, _ in every_plan), min))
    changes = [i for i in range(len(least)) if i == 0 or least[i] < least[i - 1]]
    cheapest = [every_plan[i][2] for i in changes]
    sampled = sorted(set(peaks))[:: max(1, len(set(peaks)) // 100)]
    for budget in sorted({peaks[i] for i in changes} | set(sampled)):
        solution = cheapest_within(profile, budget, SCOPE_FORWARD_BACKWARD)
        assert solution is not None
        assert solution.recompute_ps == least[bisect.bisect_right(peaks, budget) - 1]
    units = [c for c in cheapest if planner.plan_of(c).stored_units]
    assert units, "some budget is met most cheaply by storing one unit on its own"
    for choices in units[:3]:
        work = build_workload(spec, planner.plan_of(choices), "cpu")
        train_step(work)
        measured = measure_memory(work).forward_backward_peak_bytes
        assert measured == predict(profile, choices).peak_in(SCOPE_FORWARD_BACKWARD), choices
