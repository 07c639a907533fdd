"""Choices inside a unit: a whole layer recomputed keeping a chosen set of its operators'
outputs, the sets taken from the Pareto frontier of bytes kept and recompute time saved.

The planner offers them beside the unit options, profiles them like any option, and stays
exact: its solver equals an exhaustive search over the richer option set, and the plans it
picks measure on the CPU as predicted, to the byte.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable

import pytest
import torch

from memexp import operator_choices, planner
from memexp.config import ExperimentSpec
from memexp.measure.memory import measure_memory
from memexp.model import Recompute
from memexp.operator_choices import OperatorGroup, pareto_sets, spread_evenly
from memexp.plan import LAYER, CheckpointPlan
from memexp.planner import cheapest_within, predict
from memexp.results import SCOPE_FORWARD_BACKWARD
from memexp.training import backward, build_workload, forward_loss, train_step

SpecFn = Callable[..., ExperimentSpec]
HEAVY = ("model.layers=3", "seq.len=64", "model.vocab_size=64")


def group(index: int, memory: int, runtime: float) -> OperatorGroup:
    return OperatorGroup(frozenset({index}), memory, runtime)


def test_the_frontier_holds_every_set_no_other_beats() -> None:
    """A (2 B, 5 ms), B (2 B, 1 ms), C (3 B, 4 ms): of the eight sets, C alone (3 B, 4 ms) is
    beaten by A (2 B, 5 ms), B by A, B+C (5 B, 5 ms) by A+C (5 B, 9 ms); what is left, by
    bytes: none, A, A+B (4 B, 6 ms), A+C, all three (7 B, 10 ms)."""
    a, b, c = group(0, 2, 5.0), group(1, 2, 1.0), group(2, 3, 4.0)
    assert pareto_sets([a, b, c]) == [
        (0, frozenset()),
        (2, frozenset({0})),
        (4, frozenset({0, 1})),
        (5, frozenset({0, 2})),
        (7, frozenset({0, 1, 2})),
    ]


def test_choices_are_spread_evenly_over_the_bytes_kept() -> None:
    """Three of 0, 1, 2, 3, 10 B: those nearest to 0, 5 and 10 B."""
    assert spread_evenly([0, 1, 2, 3, 10], 3) == [0, 3, 4]
    assert spread_evenly([0, 1, 2], 3) == [0, 1, 2]


def test_a_plan_keeping_chosen_operator_outputs_reads_back_as_layer_options() -> None:
    """sac_milp's plans (one-layer checkpoints with their own lists) are layer options too, so
    one profile prices and predicts them beside adaptive's."""
    plan = CheckpointPlan(3, segments=((0, 1), (2, 3)), saved_ops=((0, ("mm#0", "bmm#1")), (2, ())))
    options = planner.options_of(plan)
    assert options == ((planner.kept_outputs_token(("mm#0", "bmm#1")),), (), (LAYER,))
    assert planner.keeps_chosen_outputs(options[0]) and not planner.keeps_chosen_outputs(options[2])
    assert planner.plan_of(options) == CheckpointPlan(
        3, segments=((0, 1), (2, 3)), saved_ops=((0, ("mm#0", "bmm#1")),)
    )


def test_a_whole_layer_is_timed_recomputed() -> None:
    """Measured costs time one layer under each option's units: a whole layer recomputed (a
    one-layer checkpoint in a plan) is one of them, plain or keeping its chosen outputs."""
    assert planner.option_units((LAYER,)) == {LAYER: Recompute()}
    kept = planner.option_units((planner.kept_outputs_token(("mm#0",)),))
    assert set(kept) == {LAYER} and kept[LAYER].context_fn is not None
    assert planner.option_units(("ffn",)) == {"ffn": Recompute()}
    assert planner.option_units(()) == {}


@pytest.mark.slow
def test_solver_matches_exhaustive_search_with_operator_choices(tiny_spec: SpecFn) -> None:
    """Over the 17 unit options and the layer's operator choices on 3 layers, at every budget
    between two plans' peaks: the solver's cost is the least of the plans that fit, the plans it
    picks that keep chosen outputs measure on the CPU as predicted, to the byte, and they
    compute what `none` computes, bit for bit."""
    spec = tiny_spec(*HEAVY)
    profile = planner.profile_step(spec, (), operator_choices=True)
    stats, _, _ = operator_choices.layer_operators(spec)
    numbered = set(operator_choices.saved_operator_names(stats, [1] * len(stats.func_names)))
    kept = [option for option in profile.options if planner.keeps_chosen_outputs(option)]
    assert 0 < len(kept) <= operator_choices.MAX_CHOICES
    for option in kept:
        assert set(planner.plan_of((option,)).saved_ops_of(0)) <= numbered
    scope = SCOPE_FORWARD_BACKWARD
    by_peak = sorted(
        (predict(profile, choices).peak_in(scope), predict(profile, choices).recompute_ps, choices)
        for choices in itertools.product(profile.options, repeat=profile.layers)
    )
    peaks = [peak for peak, _, _ in by_peak]
    cheapest_so_far = list(itertools.accumulate((cost for _, cost, _ in by_peak), min))
    chosen = set()
    for budget in sorted(set(peaks)):
        solution = cheapest_within(profile, budget, scope)
        assert solution is not None
        assert solution.recompute_ps == cheapest_so_far[bisect.bisect_right(peaks, budget) - 1]
        chosen.add(solution.choices)
    keeping = sorted(c for c in chosen if any(map(planner.keeps_chosen_outputs, c)))
    assert keeping, "some budget is met most cheaply by keeping chosen outputs"
    expected = None
    for choices in keeping:
        work = build_workload(spec, planner.plan_of(choices), "cpu")
        train_step(work)
        measured = measure_memory(work)
        prediction = predict(profile, choices)
        assert measured.forward_backward_peak_bytes == prediction.peak_in(scope), choices
        assert measured.peak_bytes == prediction.peak_bytes, choices
        if expected is None:
            expected = loss_and_grads(spec, CheckpointPlan.nothing(spec.model.layers))
        assert all(map(torch.equal, loss_and_grads(spec, planner.plan_of(choices)), expected))


def loss_and_grads(spec: ExperimentSpec, plan: CheckpointPlan) -> list[torch.Tensor]:
    work = build_workload(spec, plan, "cpu")
    loss = forward_loss(work)
    backward(loss)
    return [loss.detach(), *(p.grad for p in work.model.parameters())]
