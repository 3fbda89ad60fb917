"""Bit allocation: turn per-row importance scores into widths that meet a budget.

The budget is the average number of bits per K/V element of the card's
payload, counting every byte stored per row: codes, group scales, group
minimums and the one-byte width tag of each row. Token ids, positions and
the header are not part of it.

The allocator minimises the importance-weighted distortion
sum(score * D(width)) under that byte budget, with D(w) = 1 / (2^w - 1)^2,
the relative mean squared error of a w-bit grid over a group's range. Widths
on the lower convex hull of (bytes, D) make the greedy choice by
distortion saved per byte optimal up to the last partial step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .codec import LOSSLESS_WIDTH, WIDTHS, row_bytes
from .errors import BudgetError

# Bytes of per-row metadata stored beside the codes: the width tag.
ROW_TAG_BYTES = 1
MAX_BUDGET_BITS = 16.0


def distortion(bits: int) -> float:
    """Relative mean squared error model of one width (f16 passthrough for 16)."""
    if bits >= LOSSLESS_WIDTH:
        return 2.0**-24
    return 1.0 / float((1 << bits) - 1) ** 2


@dataclass
class RowGroup:
    """Rows that share a row length: one layer's keys or values in one section."""

    n: int  # elements per row
    scores: np.ndarray  # (n_rows,) float64 >= 0
    # (n_rows,) uint8 widest width each row may take, or None for no limit. A row
    # that already lost precision in an earlier card gains nothing above its old width.
    max_bits: np.ndarray | None = None
    # {width: bytes of one row, width tag excluded}, or None for the row layout
    # of the codec at the allocator's group size.
    sizes: dict[int, int] | None = None
    # Bytes the group stores whatever the widths, such as the block headers of
    # the channel layout (charged in full even when a block ends up lossless).
    fixed_bytes: int = 0
    # {width: (n_rows,) measured distortion of each row at that width}, on the
    # scale of `distortion()`, or None to use the model for every row.
    measured: dict[int, np.ndarray] | None = None

    def distortions(self, bits: int) -> np.ndarray | float:
        if self.measured is not None and bits in self.measured:
            return self.measured[bits]
        return distortion(bits)

    def row_bytes(self, bits: int, group_size: int) -> int:
        return self.sizes[bits] if self.sizes is not None else row_bytes(bits, self.n, group_size)


def _hull_widths(group: RowGroup, group_size: int, widths: tuple[int, ...]) -> list[int]:
    """Widths on the lower convex hull of (row bytes, distortion), cheapest first."""
    points = sorted((group.row_bytes(w, group_size), distortion(w), w) for w in widths)
    hull: list[tuple[int, float, int]] = []
    for point in points:
        if hull and point[0] == hull[-1][0]:
            if point[1] < hull[-1][1]:
                hull.pop()
            else:
                continue
        while len(hull) >= 2:
            (b0, d0, _), (b1, d1, _) = hull[-2], hull[-1]
            # Drop the middle point when it lies on or above the segment.
            if (d1 - d0) * (point[0] - b0) >= (point[1] - d0) * (b1 - b0):
                hull.pop()
            else:
                break
        if not hull or point[1] < hull[-1][1]:
            hull.append(point)
    return [w for _, _, w in hull]


def payload_bytes(groups: list[RowGroup], bits: list[np.ndarray], group_size: int) -> int:
    """Return the payload bytes of rows stored at the given widths, width tags and fixed bytes included."""
    total = 0
    for group, widths in zip(groups, bits, strict=True):
        total += group.fixed_bytes
        table = {w: group.row_bytes(w, group_size) + ROW_TAG_BYTES for w in WIDTHS}
        values, counts = np.unique(widths, return_counts=True)
        total += sum(table[int(v)] * int(c) for v, c in zip(values, counts, strict=True))
    return total


def allocate(
    groups: list[RowGroup],
    budget_bits: float,
    group_size: int,
    widths: tuple[int, ...] = WIDTHS,
) -> list[np.ndarray]:
    """Choose a width for every row so the payload stays within the budget.

    Args:
        groups: row groups with their importance scores.
        budget_bits: average bits per K/V element, all payload bytes counted.
            16 or more stores every row as f16 (lossless for f16 caches).
        group_size: elements per scale group of the codec.
        widths: the widths rows may take.

    Returns:
        One uint8 array of widths per group, in the order of `groups`.

    Raises:
        BudgetError: when the budget is not finite, not positive, or below
            what the narrowest width needs (the message gives that minimum).
    """
    if not math.isfinite(budget_bits) or budget_bits <= 0:
        raise BudgetError(f"invalid budget {budget_bits!r} bits per element; use a value in (0, 16]")
    if budget_bits >= MAX_BUDGET_BITS:
        return [np.full(g.scores.shape[0], LOSSLESS_WIDTH, dtype=np.uint8) for g in groups]

    n_elements = sum(g.n * g.scores.shape[0] for g in groups)
    budget_bytes = int(budget_bits * n_elements / 8)

    hulls = [_hull_widths(g, group_size, tuple(sorted(widths))) for g in groups]
    base = sum(
        (g.row_bytes(h[0], group_size) + ROW_TAG_BYTES) * g.scores.shape[0] + g.fixed_bytes
        for g, h in zip(groups, hulls, strict=True)
    )
    if base > budget_bytes:
        minimum = 8.0 * base / n_elements
        raise BudgetError(
            f"budget {budget_bits:g} bits per element is below the minimum {minimum:.3f} "
            f"(every row at {min(widths)} bits with its scales); raise the budget or the group size"
        )

    # One upgrade item per row and hull step, valued by distortion saved per byte.
    values, costs, rows, steps = [], [], [], []
    row_offset = 0
    for group, hull in zip(groups, hulls, strict=True):
        n_rows = group.scores.shape[0]
        row_ids = np.arange(row_offset, row_offset + n_rows)
        previous_value: np.ndarray | None = None
        for k in range(len(hull) - 1):
            cost = group.row_bytes(hull[k + 1], group_size) - group.row_bytes(hull[k], group_size)
            gain = np.maximum(group.distortions(hull[k]) - group.distortions(hull[k + 1]), 0.0)
            value = np.broadcast_to(group.scores * (gain / cost), (n_rows,))
            if previous_value is not None:
                # A row's later steps may not be worth more than its earlier ones, or
                # the greedy pass could take a step without the one before it.
                value = np.minimum(value, previous_value)
            previous_value = value
            allowed = slice(None) if group.max_bits is None else group.max_bits >= hull[k + 1]
            values.append(value[allowed])
            costs.append(np.full(n_rows, cost, dtype=np.int64)[allowed])
            rows.append(row_ids[allowed])
            steps.append(np.full(n_rows, k, dtype=np.int16)[allowed])
        row_offset += n_rows

    step_count = np.zeros(row_offset, dtype=np.int16)
    if values:
        value = np.concatenate(values)
        cost = np.concatenate(costs)
        row = np.concatenate(rows)
        step = np.concatenate(steps)
        # Highest value first; ties go to earlier steps, then to later rows (recent tokens).
        order = np.lexsort((-row, step, -value))
        spent = np.cumsum(cost[order])
        remaining = budget_bytes - base
        n_taken = int(np.searchsorted(spent, remaining, side="right"))
        taken = order[:n_taken]
        np.add.at(step_count, row[taken], 1)
        left = remaining - (int(spent[n_taken - 1]) if n_taken else 0)
        # Fill what is left with the most valuable next steps that still fit.
        # Each step taken here costs at least the smallest step, so the loop is short.
        rest = order[n_taken:]
        rest = rest[step[rest] == step_count[row[rest]]]
        while rest.size:
            fits = np.flatnonzero(cost[rest] <= left)
            if fits.size == 0:
                break
            item = rest[fits[0]]
            step_count[row[item]] += 1
            left -= int(cost[item])
            rest = rest[fits[0] + 1 :]
            rest = rest[row[rest] != row[item]]

    out = []
    row_offset = 0
    for group, hull in zip(groups, hulls, strict=True):
        n_rows = group.scores.shape[0]
        table = np.asarray(hull, dtype=np.uint8)
        out.append(table[step_count[row_offset : row_offset + n_rows]])
        row_offset += n_rows
    return out
