"""Dynamic batching's data: sequence lengths in buckets, and a batch per bucket with its cost.

Padding every sequence to the longest one a dataset holds wastes memory on padding and forces
one small batch everywhere. Grouping sequences of similar length into buckets lets each bucket
pad only to its own longest sequence and run the largest batch that fits at that length, so
short sequences travel many to a step. This module holds the arithmetic and the data only, in
plain Python (the configuration reads lengths with it, and composing a config imports no torch):

* `read_lengths`: a file of sequence lengths, one a line (`512`), or a histogram (`512:40`,
  `length:count`), or both mixed; blank lines and `#` comments are skipped;
* `bucket_bounds` and `make_buckets`: the bucket boundaries, given or chosen by a rule
  (`pow2`, `quantile`), and the buckets they cut the lengths into;
* `BucketTable`: per bucket the batch that fits, tokens per step and padding waste, and the
  comparison with one fixed batch at the longest length (its batches come from elsewhere:
  `memexp.estimate.choose_bucket_batches` predicts them on fake tensors);
* `memexp.batching.BucketBatchSampler` (a `torch.utils.data` batch sampler) yields index
  batches from a table's batches.

A bucket holds the lengths above the previous bucket's longest up to its own longest: its
batches pad to that length, never to a boundary no sequence reaches.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

POW2 = "pow2"
QUANTILE = "quantile"
BUCKET_RULES = (POW2, QUANTILE)
GIVEN = "given"  # the rule's name when boundaries are given


class LengthsError(ValueError):
    """A lengths file that cannot be read as lengths: says where and why."""


def _parse_line(text: str) -> tuple[int, int]:
    length, _, count = text.partition(":")
    return int(length), int(count) if count.strip() else 1


def read_lengths(path: str | Path) -> Counter[int]:
    """Length → number of sequences, from a file of `length` or `length:count` lines."""
    path = Path(path)
    if not path.is_file():
        raise LengthsError(f"no such file: {path}")
    counts: Counter[int] = Counter()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            length, count = _parse_line(text)
        except ValueError:
            raise LengthsError(
                f"line {number} holds {text!r}: expected an integer length, or length:count"
            ) from None
        if length <= 0 or count <= 0:
            raise LengthsError(f"line {number} holds {text!r}: lengths and counts are positive")
        counts[length] += count
    if not counts:
        raise LengthsError(f"{path} holds no lengths")
    return counts


def _pow2_bounds(lengths: Sequence[int]) -> list[int]:
    """Every power of two from the one at or above the shortest length to the one at or above
    the longest: buckets (2^(k-1), 2^k]."""
    low = math.ceil(math.log2(min(lengths)))
    high = math.ceil(math.log2(max(lengths)))
    return [2**k for k in range(low, high + 1)]


def _quantile_bounds(counts: Mapping[int, int], buckets: int) -> list[int]:
    """The shortest length at or below which at least i/n of the sequences lie, i = 1..n:
    buckets of about equal numbers of sequences (fewer when many share one length)."""
    total = sum(counts.values())
    targets = [math.ceil(i * total / buckets) for i in range(1, buckets + 1)]
    bounds, seen = [], 0
    for length in sorted(counts):
        seen += counts[length]
        while targets and seen >= targets[0]:
            targets.pop(0)
            if not bounds or bounds[-1] != length:
                bounds.append(length)
    return bounds


def bucket_bounds(
    counts: Mapping[int, int], given: Sequence[int], rule: str, bucket_count: int
) -> list[int]:
    """The buckets' upper bounds (inclusive): `given` when there are any, else the rule's."""
    if given:
        return sorted(given)
    if rule == POW2:
        return _pow2_bounds(list(counts))
    if rule == QUANTILE:
        return _quantile_bounds(counts, bucket_count)
    raise ValueError(f"unknown bucket rule {rule!r}: one of {', '.join(BUCKET_RULES)}")


@dataclass(frozen=True)
class Bucket:
    """Sequences of lengths `shortest` to `longest`; its batches pad to `longest`."""

    shortest: int
    longest: int
    sequences: int
    tokens: int  # the sequences' own tokens, padding excluded


@dataclass(frozen=True)
class Buckets:
    """Lengths cut into buckets, shortest first, and how the cut was chosen."""

    buckets: tuple[Bucket, ...]
    rule: str  # `given`, `pow2` or `quantile` (with its count)
    source: str  # where the lengths came from

    @property
    def longest(self) -> int:
        return self.buckets[-1].longest

    @property
    def sequences(self) -> int:
        return sum(bucket.sequences for bucket in self.buckets)

    @property
    def tokens(self) -> int:
        return sum(bucket.tokens for bucket in self.buckets)


def make_buckets(
    counts: Mapping[int, int], bounds: Sequence[int], rule: str, source: str
) -> Buckets:
    """The non-empty buckets `bounds` cut `counts` into; lengths above the last bound make one
    more bucket up to the longest length."""
    edges = [*sorted(bounds)]
    if max(counts) > edges[-1]:
        edges.append(max(counts))
    found, low = [], 0
    for high in edges:
        inside = {length: n for length, n in counts.items() if low < length <= high}
        if inside:
            found.append(
                Bucket(
                    shortest=min(inside),
                    longest=max(inside),
                    sequences=sum(inside.values()),
                    tokens=sum(length * n for length, n in inside.items()),
                )
            )
        low = high
    return Buckets(tuple(found), rule, source)


@dataclass(frozen=True)
class BucketBatch:
    """One bucket's batch and what it costs: `predicted_peak_bytes` from the batch search,
    `measured_peak_bytes` where a real device confirmed it. `whole_bucket`: the batch holds
    every sequence of the bucket, so a larger one, though it may fit, would carry only padding."""

    bucket: Bucket
    batch: int
    predicted_peak_bytes: int
    whole_bucket: bool = False
    measured_peak_bytes: int | None = None

    @property
    def steps(self) -> int:
        return math.ceil(self.bucket.sequences / self.batch)

    @property
    def padded_tokens(self) -> int:
        """Tokens the bucket's steps carry, padding included."""
        return self.bucket.sequences * self.bucket.longest

    @property
    def tokens_per_step(self) -> int:
        """A full batch's tokens, padding included: the step's size in memory."""
        return self.batch * self.bucket.longest

    @property
    def padding_pct(self) -> float:
        return 100.0 * (1 - self.bucket.tokens / self.padded_tokens)


@dataclass(frozen=True)
class BucketTable:
    """A batch per bucket within `budget_bytes`, against one fixed batch at the longest length
    (the largest that fits there, at most every sequence), over one pass over the lengths."""

    buckets: Buckets
    rows: tuple[BucketBatch, ...]
    budget_bytes: int
    fixed_batch: int
    fixed_peak_bytes: int
    source: str  # where the predicted peaks come from
    imagine: str | None = None  # whose code paths the predictions followed
    measured_source: str | None = None  # where the measured peaks come from, if any

    @property
    def batches(self) -> dict[int, int]:
        """Bucket's longest length → its batch: what `memexp.batching.BucketBatchSampler` takes."""
        return {row.bucket.longest: row.batch for row in self.rows}

    @property
    def fixed_steps(self) -> int:
        return math.ceil(self.buckets.sequences / self.fixed_batch)

    @property
    def steps(self) -> int:
        return sum(row.steps for row in self.rows)

    @property
    def fixed_padded_tokens(self) -> int:
        return self.buckets.sequences * self.buckets.longest

    @property
    def padded_tokens(self) -> int:
        return sum(row.padded_tokens for row in self.rows)

    @property
    def fixed_padding_pct(self) -> float:
        return 100.0 * (1 - self.buckets.tokens / self.fixed_padded_tokens)

    @property
    def padding_pct(self) -> float:
        return 100.0 * (1 - self.buckets.tokens / self.padded_tokens)

    @property
    def padding_saved_tokens(self) -> int:
        """Padding tokens the buckets avoid, against the fixed batch padding to the longest."""
        return self.fixed_padded_tokens - self.padded_tokens

    @property
    def padding_saved_pct(self) -> float:
        """The share of the fixed batch's padding the buckets avoid (0 when it has none)."""
        padding = self.fixed_padded_tokens - self.buckets.tokens
        return 100.0 * self.padding_saved_tokens / padding if padding else 0.0

    @property
    def fixed_tokens_per_step(self) -> float:
        """The sequences' own tokens per step, averaged over one pass, at the fixed batch."""
        return self.buckets.tokens / self.fixed_steps

    @property
    def tokens_per_step(self) -> float:
        return self.buckets.tokens / self.steps

    @property
    def tokens_per_step_gain(self) -> float:
        """Own tokens per step, buckets over fixed batch: the same tokens in fewer steps."""
        return self.fixed_steps / self.steps
