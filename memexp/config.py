"""Structured configs (typed at composition), the validated job they become, and the config error.

These are leaves: every room may read a config or an ExperimentSpec. Turning a composed config
into a spec (the checks that span fields or the machine) is `memexp.configure`'s job, because it
needs to know every strategy.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING

from memexp.buckets import Buckets

ATTENTION_KINDS = ("naive", "sdpa")
# Whose layer a preset builds: the seed's (memexp.model) or a published architecture built with
# `transformers` (memexp.hf_model, the `.[hf]` extra).
SEED_ARCHITECTURE = "seed"
ARCHITECTURES = (SEED_ARCHITECTURE, "llama", "mistral", "gpt2")
# The model fields an architecture's layer has no choice in, and the value each must keep.
FIXED_MODEL_FIELDS: dict[str, dict[str, Any]] = {
    SEED_ARCHITECTURE: {
        "kv_heads": None,
        "act": "gelu",
        "norm_eps": 1e-5,
        "tie_embeddings": False,
        "sliding_window": None,
    },
    "llama": {"sliding_window": None},
    "mistral": {"bias": False},
    "gpt2": {"kv_heads": None, "sliding_window": None, "bias": True},
}
# The distribution that builds the real architectures: the `.[hf]` extra.
TRANSFORMERS = "transformers"
FAKE_DEVICE = "fake"  # predicts on fake tensors: nothing is allocated or computed
# A GPU: its step times are synchronised device times, steady enough to price options.
CUDA_DEVICE = "cuda"
DEVICE_TYPES = ("auto", "cpu", "cuda", FAKE_DEVICE)
IMAGINED_DEVICES = ("cuda", "cpu")
# The rates the adaptive planner's roofline assumes when `device.peak_tflops` or
# `device.memory_gbps` is not given, per imagined device: (peak TFLOP/s, memory GB/s). cuda: an
# H200 (989 TFLOP/s bf16 dense, 4.8 TB/s HBM3e), as the fake device's 141 GiB imagines; cpu: a
# many-core server socket (2 TFLOP/s fp32 FMA, 200 GB/s DDR5). Only their ratio shapes a plan:
# it says how dear memory-bound recomputation (softmax, GELU, LayerNorm) is against matmuls.
ROOFLINE_DEFAULTS: dict[str, tuple[float, float]] = {"cuda": (989.0, 4800.0), "cpu": (2.0, 200.0)}
# The links the planner prices an offloading option's transfers over when `device.host_gbps` or
# `device.disk_gbps` is not given, in GB/s each way: the fake preset's (PCIe 5.0 x16 pinned
# copies; one PCIe 4.0 NVMe drive).
LINK_DEFAULTS_GBPS: dict[str, float] = {"host": 55.0, "disk": 7.0}
PRECISIONS = ("fp32", "bf16")
# What a job returns to Hydra's sweeper (`objective`); memexp.objective reads each from the record.
OBJECTIVES = ("step_ms", "peak_bytes", "forward_backward_peak_bytes", "tokens_per_s")
OPTIMIZERS = ("adam", "adamw", "sgd")
# How the training state is spread over `parallel.world_size` ranks (docs/memory_model.md):
# none: one device; ddp: every rank holds everything, gradients all-reduced; zero1: optimizer
# state sharded; zero2: gradients too; fsdp: parameters too (ZeRO-3).
PARALLEL_NONE = "none"
PARALLEL_MODES = (PARALLEL_NONE, "ddp", "zero1", "zero2", "fsdp")
# The modes built on FSDP2's `fully_shard`, the only ones its mixed-precision and CPU-offload
# policies reach; and the one whose parameters are resharded after the forward.
FULLY_SHARDED_MODES = ("zero2", "fsdp")
RESHARDING_MODE = "fsdp"
# ZeRO-1 (PyTorch's ZeroRedundancyOptimizer), and the modes whose ranks hold DDP's buckets.
OPTIMIZER_SHARDED_MODE = "zero1"
BUCKETED_MODES = ("ddp", OPTIMIZER_SHARDED_MODE)


class ConfigError(ValueError):
    """A config value that cannot run: names the field, the value, and what is allowed."""

    def __init__(self, field_name: str, value: Any, allowed: str) -> None:
        self.field_name = field_name
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field_name}={value!r} is not allowed: {allowed}")


def require_transformers(architecture: str) -> None:
    """A one-line ConfigError when a real architecture is asked for without `transformers`."""
    if architecture != SEED_ARCHITECTURE and importlib.util.find_spec(TRANSFORMERS) is None:
        raise ConfigError(
            "model.architecture",
            architecture,
            f"{SEED_ARCHITECTURE} (the others need transformers: pip install 'memexp[hf]')",
        )


@dataclass
class ModelConfig:
    name: str = MISSING
    vocab_size: int = MISSING
    hidden: int = MISSING
    layers: int = MISSING
    heads: int = MISSING
    ffn_hidden: int = MISSING
    # Rows of the learned position table. None: exactly the job's seq.len, as the seed builds
    # its model (max_seq_len=seq_len); a number fixes a larger table (GPT-2 has 1024 positions)
    # and caps seq.len. `memexp.configure.validate` resolves it: a spec's model holds a number.
    max_seq_len: int | None = None
    # Biases on the qkv, output and both FFN projections: GPT-2 has them, the seed and LLaMA do
    # not. The vocabulary head never has one (the seed's is bias-free, GPT-2's is the tied,
    # bias-free token embedding).
    bias: bool = False
    attention: str = "naive"
    # The layer built: `seed` (the seed's) or a real architecture (llama, mistral, gpt2) built by
    # `transformers` from the fields below, which the seed's layer does not have: each keeps its
    # seed value (the default) under `architecture: seed`.
    architecture: str = SEED_ARCHITECTURE
    kv_heads: int | None = None  # key/value heads (grouped-query attention); None: `heads`
    # The FFN's activation, a `transformers.activations.ACT2FN` name: the seed's exact `gelu`;
    # GPT-2's `gelu_new` (tanh approximation); `silu` in Llama and Mistral's gated FFN (SwiGLU).
    act: str = "gelu"
    norm_eps: float = 1e-5  # LayerNorm's (seed, GPT-2) or RMSNorm's (Llama, Mistral) epsilon
    rope_theta: float = 10000.0  # rotary embeddings' base (Llama, Mistral)
    tie_embeddings: bool = False  # the head is the token embedding (GPT-2)
    sliding_window: int | None = None  # tokens each query sees (Mistral); None: all before it
    # The preset's own workload, used when seq/batch are left at their `default` option.
    seq_len: int = MISSING
    batch_size: int = MISSING


@dataclass
class SeqConfig:
    len: int = MISSING


@dataclass
class BatchConfig:
    size: int = MISSING
    # auto: the largest batch whose predicted peak fits the budget (searched from `size` up).
    auto: bool = False
    budget_gb: float | None = None  # GiB; None: the device's memory
    # dynamic: sequences of the lengths in `lengths` (a file) cut into buckets, the largest batch
    # that fits per bucket (memexp.buckets). Buckets: the upper bounds `buckets`, else the rule
    # `bucket_rule` (pow2, or quantile with `bucket_count` buckets).
    dynamic: bool = False
    lengths: str | None = None
    buckets: list[int] = field(default_factory=list)
    bucket_rule: str = "pow2"
    bucket_count: int = 4


@dataclass
class DeviceConfig:
    type: str = "auto"
    # The device a step must fit on, in GiB (2**30 bytes); None: the GPU's own, unknown on a CPU.
    memory_gb: float | None = None
    # For step-time estimates from FLOPs (fake device): peak TFLOP/s and the fraction reached.
    peak_tflops: float | None = None
    utilization: float = 0.4
    # The memory rate in GB/s (10^9 bytes), for the planner's roofline of memory-bound ops;
    # None: the imagined device's (ROOFLINE_DEFAULTS), as is peak_tflops there when None.
    memory_gbps: float | None = None
    # Fake device: whose default code paths the step follows where PyTorch lets us choose.
    imagine: str = "cuda"
    # GB/s (10⁹ bytes a second) of the host link and of the disk, for offloading's transfer
    # time in predictions; None: not estimated. conf/device/fake.yaml sets the imagined H200's.
    host_gbps: float | None = None
    disk_gbps: float | None = None


@dataclass
class ParallelConfig:
    """The data-parallel sharding one job imagines or runs: what each of `world_size` ranks holds."""

    name: str = PARALLEL_NONE  # none | ddp | zero1 | zero2 | fsdp
    world_size: int = 1
    # fsdp only: free the gathered parameters after each layer's forward (gather them again for
    # backward); false keeps them to the backward, as zero2 always does.
    reshard_after_forward: bool = True
    # zero2/fsdp (fully_shard's MixedPrecisionPolicy): the dtype parameters are gathered and
    # computed in, and the dtype gradients are reduced in; None: the parameters' own (fp32).
    param_dtype: str | None = None
    reduce_dtype: str | None = None
    # zero2/fsdp (fully_shard's CPUOffloadPolicy): sharded parameters, gradients and optimizer
    # state live in host memory; the optimizer step runs there.
    cpu_offload: bool = False

    def reshards_after_forward(self) -> bool:
        """Whether gathered parameters are freed after each unit's forward: fsdp's knob (zero2
        never frees them before the backward)."""
        return self.name == RESHARDING_MODE and self.reshard_after_forward


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 1e-4  # the seed's


@dataclass
class MeasureConfig:
    warmup: int = 1
    # The fewest timed steps. More follow until the step time is stable (IQR / median at most
    # `stable_iqr`, torch.utils.benchmark's adaptive_autorange rule) or the timed steps have
    # taken `max_time_s` seconds in all, whichever comes first.
    repeat: int = 3
    max_time_s: float = 2.0
    stable_iqr: float = 0.1
    # PyTorch's intra-op threads for the job (restored after it); None: PyTorch's default. On a
    # shared machine fewer threads than cores avoid waiting on a descheduled one at every op.
    threads: int | None = None
    # Under a `parallel` mode: seconds every rank together may take for the whole measured step
    # before the job is recorded as failed and its ranks are stopped (a hung rank never hangs a
    # sweep).
    rank_timeout_s: float = 600.0


class WandbMode(Enum):
    """W&B's run modes; a typo is refused when the config is composed, not after a sweep."""

    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class LoggerConfig:
    """The experiment tracker: `name: none` (results stay local) or `wandb` (a mirror of them)."""

    name: str = "none"
    project: str = "memexp"
    entity: str | None = None
    mode: WandbMode = WandbMode.offline
    dir: str | None = None
    tags: list[str] = field(default_factory=list)
    # Seconds W&B may take to start a run; past it, one warning and local results only.
    init_timeout_s: float = 30.0


@dataclass
class Config:
    model: ModelConfig = MISSING
    # Each strategy brings its own schema (see memexp.strategies), so the node is untyped here.
    strategy: Any = MISSING
    seq: SeqConfig = MISSING
    batch: BatchConfig = MISSING
    device: DeviceConfig = MISSING
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: str = "fp32"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    seed: int = 0
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    # A sweep (or run) folder to finish in place; see memexp.resume.
    resume: str | None = None
    # The figure each job returns to the sweeper (e.g. Optuna's); see memexp.objective.
    objective: str = "step_ms"


@dataclass(frozen=True)
class ExperimentSpec:
    """A validated job: plain values, safe to hand to the model, planner and runner."""

    model: ModelConfig
    strategy: Any
    seq_len: int
    batch_size: int
    device: str
    precision: str
    optimizer: OptimizerConfig
    seed: int
    measure: MeasureConfig
    device_settings: DeviceConfig = field(default_factory=DeviceConfig)
    auto_batch: bool = False
    # The memory of the device the job runs on or imagines (device.memory_gb, else the GPU's),
    # and what one step may use of it (batch.budget_gb, else all of it); None when unknown.
    # Planners that fit a budget and the batch search read `memory_budget_bytes`.
    device_memory_bytes: int | None = None
    memory_budget_bytes: int | None = None
    # batch=dynamic: the lengths in buckets; each bucket gets the largest batch that fits.
    buckets: Buckets | None = None
    # How the state is sharded over ranks; every per-rank figure (peak, budget) is one rank's.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def searches_batch(self) -> bool:
        """The job's batch is chosen to fit its memory budget (batch=auto or batch=dynamic)."""
        return self.auto_batch or self.buckets is not None

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size

    @property
    def roofline_rates(self) -> tuple[float, float]:
        """(peak TFLOP/s, memory GB/s): the device's given ones, else its imagined device's."""
        peak, memory = ROOFLINE_DEFAULTS[self.imagined_device]
        settings = self.device_settings
        return (
            peak if settings.peak_tflops is None else settings.peak_tflops,
            memory if settings.memory_gbps is None else settings.memory_gbps,
        )

    def link_gbps(self, kind: str) -> float:
        """GB/s each way to where `kind` (host or disk) offloads: the device's, else the default."""
        given = {"host": self.device_settings.host_gbps, "disk": self.device_settings.disk_gbps}
        return LINK_DEFAULTS_GBPS[kind] if given[kind] is None else given[kind]

    @property
    def imagined_device(self) -> str:
        """Whose default code paths the step follows: the fake device's `imagine`, else the
        device the job runs on."""
        return self.device_settings.imagine if self.device == FAKE_DEVICE else self.device


def resolve_device(requested: str, cuda_available: bool) -> str:
    """`auto` means the GPU when there is one; asking for `cuda` without one is an error, not a fallback."""
    if requested == "auto":
        return "cuda" if cuda_available else "cpu"
    if requested == "cuda" and not cuda_available:
        raise ConfigError("device.type", requested, "cpu or auto (no CUDA device is visible here)")
    return requested
