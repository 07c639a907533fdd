"""The house: every import inside `memexp/` points down the declared layers, and none forms a cycle.

Imports inside functions count as much as those at the top of a module: a deferred import still
couples two rooms. The layers are declared here, lowest first; docs/architecture.md explains them.
A module may import any module of a lower layer, and, inside one package, its siblings (a
strategy imports `strategies.base`); nothing imports upward, and a module missing from the table
fails the test so that every new room is placed deliberately.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = "memexp"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Lowest first. A name stands for a module (`memexp.<name>`) or a package and all it holds.
LAYERS: tuple[tuple[str, ...], ...] = (
    # units, folder layout, data, signals, log lines; sequence lengths in buckets, their sampler
    ("text", "sweepdir", "plan", "figures", "interrupts", "logs", "buckets", "batching"),
    ("results", "config", "tidy"),  # the record schema; configs and the validated spec; tidy data
    ("observe", "memo"),  # what a running job reports; figures a sweep's jobs share
    ("compile_partition",),  # the backend a compiled forward runs under, keeping its partition
    (
        "model",
        "storage",
        "analytic",
        "environment",
        "scaling",
        "launchers",
        "resume",
        "cli_help",
        "objective",
        "ranks",
        "progress",
    ),
    ("hf_model",),  # real architectures built by transformers, behind the seed model's interface
    ("training", "sharded_states"),  # one training step in phases; a rank's states, closed form
    ("sharding",),  # one rank's share of a workload (fully_shard, ZeRO-1)
    ("measure",),  # timing, memory steps, saved bytes, FLOPs: figures, never records
    # the fake device: prediction on fake tensors, batch search; a layer's operators as PyTorch's
    # SAC estimator sees them, and the sets of their outputs worth keeping
    ("estimate", "operator_choices"),
    ("devices",),  # one measurement backend per device kind
    ("planner", "sac_planner"),  # adaptive's profile, peak model and solver; PyTorch's ILP
    ("strategies",),  # strategy → CheckpointPlan
    ("configure",),  # Hydra registration and validation (knows every strategy)
    ("record",),  # the one room that writes figures into a RunResult
    ("runner",),  # one job
    ("sweepindex",),  # record → table row, kept in the sweep's index.jsonl
    ("aggregate", "wandb_sink"),  # sweep → table; W&B mirror
    ("analysis",),  # table → orders, descriptions and derived tables plots and report share
    ("plots", "report"),  # table → figures; table → summary.md sections
    ("summarize", "wandb_report", "reproduce"),  # draw and write a sweep's outputs; reports
    ("callbacks", "job"),  # Hydra's end-of-sweep hooks; one job under its guard
    ("__main__",),  # the entry point
)
RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room(module: str) -> str:
    """`memexp.strategies.sqrt` → `strategies`; `memexp.runner` → `runner`; the package → ``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_of(path: Path, module: str) -> set[str]:
    """Every memexp module `path` imports, at the top or inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                found.add(name)
    return found


def module_graph() -> dict[str, set[str]]:
    """memexp module → the memexp modules (files) it imports."""
    files = {module_name(path): path for path in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets = set()
        for name in imports_of(path, module):
            # `from memexp.x import y` names y, which may be a function: keep the module part.
            while name not in files and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in files and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


GRAPH = module_graph()


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in GRAPH if room(m) and room(m) not in RANK)
    assert not unplaced, f"modules missing from LAYERS: {unplaced}"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module: str) -> None:
    if not room(module):
        return  # the package's __init__ imports nothing of its own
    upward = []
    for target in GRAPH[module]:
        if not room(target):
            continue
        if room(target) == room(module):
            continue  # siblings inside one package; the cycle test still watches them
        if RANK[room(target)] >= RANK[room(module)]:
            upward.append(target)
    assert not upward, f"{module} imports {sorted(upward)} at its own layer or above"


def test_no_import_cycles() -> None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in done:
            return
        assert module not in visiting, "import cycle: " + " -> ".join(
            [*visiting[visiting.index(module) :], module]
        )
        visiting.append(module)
        for target in sorted(GRAPH[module]):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)


# What the runner must reach only through interfaces (Strategy.execute, memexp.devices).
STRATEGY_NAMES = (
    "none",
    "full",
    "sqrt",
    "selective",
    "every_n",
    "op",
    "offload",
    "compress",
    "adaptive",
    "sac_milp",
    "compile_budget",
)
DEVICE_NAMES = ("cpu", "cuda", "fake", "FAKE_DEVICE")


def names_in(path: Path) -> set[str]:
    """Every identifier and imported module part in `path`, and every word of its string
    literals other than docstrings."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.update(node.name.split("."))
            names.add(node.asname or "")
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update(node.module.split("."))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            names.update(re.findall(r"\w+", node.value))
    return names


def test_the_runner_names_no_strategy_and_no_device() -> None:
    named = names_in(ROOT / "runner.py") & {*STRATEGY_NAMES, *DEVICE_NAMES}
    assert not named, f"memexp/runner.py names {sorted(named)}: reach them through interfaces"


def test_the_name_check_sees_strings_and_imports(tmp_path: Path) -> None:
    source = tmp_path / "source.py"
    source.write_text(
        '"""Mentions cuda in a docstring only."""\n'
        "from memexp.strategies import adaptive\n"
        "from memexp.config import FAKE_DEVICE\n"
        'DEVICE = f"{adaptive} on cpu"\n'
    )
    assert names_in(source) & {*STRATEGY_NAMES, *DEVICE_NAMES} == {"adaptive", "FAKE_DEVICE", "cpu"}
