"""Metrics of the quality harness: KL divergence, top-1 and greedy agreement, GSM8K answers, summaries.

Every function here is pure: it takes logits, token ids or text and
returns numbers (or, for `nudged_card`, a new card), so the harness in
`quality.py`, the calibration in `sensitivity.py` and the tests share one
definition of each metric. Logits are `(n_positions, n_vocab)` arrays in
llama.cpp's order; distributions are compared in float64.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .card import CacheCard

# Rows of (n_positions, n_vocab) logits handled per step, which bounds the
# float64 temporaries to ROW_CHUNK * n_vocab * 8 bytes (32 MiB for Gemma 3's
# vocabulary of 262,144).
ROW_CHUNK = 16

# A number in free text: optional sign, digits with optional thousands
# separators, optional decimals ("1,234.50", "-3", "18").
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# GSM8K solutions carry calculator annotations such as "<<16-3-4=9>>".
_CALCULATOR = re.compile(r"<<[^<>]*>>")
GSM8K_ANSWER_MARK = "####"


# -- distributions ----------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Return log-probabilities of `logits` (..., n_vocab) along the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_per_position(ref_log_probs: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Return KL(P_ref || Q) in nats at each position.

    Args:
        ref_log_probs: (n_positions, n_vocab) log-probabilities of the reference
            (from `log_softmax`).
        logits: (n_positions, n_vocab) logits of the compared model state.

    Returns:
        (n_positions,) float64, each >= 0 up to rounding; exactly 0 where the
        logits equal the ones `ref_log_probs` came from.
    """
    ref = np.asarray(ref_log_probs, dtype=np.float64)
    if ref.shape != logits.shape:
        raise ValueError(
            f"reference log-probabilities have shape {ref.shape} but logits {logits.shape}; pass one row per position"
        )
    out = np.empty(ref.shape[0], dtype=np.float64)
    for start in range(0, ref.shape[0], ROW_CHUNK):
        stop = start + ROW_CHUNK
        log_p = ref[start:stop]
        log_q = log_softmax(logits[start:stop])
        out[start:stop] = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    return out


def reference_log_probs(logits: np.ndarray) -> np.ndarray:
    """Return float64 log-probabilities of (n_positions, n_vocab) logits, computed in row chunks."""
    out = np.empty(logits.shape, dtype=np.float64)
    for start in range(0, logits.shape[0], ROW_CHUNK):
        out[start : start + ROW_CHUNK] = log_softmax(logits[start : start + ROW_CHUNK])
    return out


def top1_agreement(ref_top1: np.ndarray, logits: np.ndarray) -> float:
    """Return the share of positions whose arg-max token equals the reference's, in [0, 1]."""
    got = np.asarray(logits).argmax(axis=-1)
    if got.shape != ref_top1.shape:
        raise ValueError(
            f"reference has {ref_top1.shape[0]} positions but logits {got.shape[0]}; pass one row per position"
        )
    return float(np.mean(got == ref_top1)) if got.size else math.nan


def sequence_log_likelihood(logits: np.ndarray, targets: Sequence[int]) -> float:
    """Return the sum of log p(targets[i] | logits[i]) in nats.

    `logits[i]` must be the distribution that predicts `targets[i]`, that is
    the logits after the token before it. Computed in float64.
    """
    target_ids = np.asarray(targets, dtype=np.int64)
    if logits.shape[0] != target_ids.shape[0]:
        raise ValueError(
            f"got {logits.shape[0]} logit rows for {target_ids.shape[0]} target tokens; pass one row per target"
        )
    total = 0.0
    for start in range(0, target_ids.shape[0], ROW_CHUNK):
        rows = np.asarray(logits[start : start + ROW_CHUNK], dtype=np.float64)
        peak = rows.max(axis=-1)
        log_norm = peak + np.log(np.exp(rows - peak[:, None]).sum(axis=-1))
        chosen = rows[np.arange(rows.shape[0]), target_ids[start : start + ROW_CHUNK]]
        total += float(np.sum(chosen - log_norm))
    return total


def leading_agreement(reference: Sequence[int], got: Sequence[int]) -> int:
    """Count the tokens before the first difference between two token sequences."""
    n = 0
    for a, b in zip(reference, got, strict=False):
        if a != b:
            break
        n += 1
    return n


# -- GSM8K ----------------------------------------------------------------------------


def normalize_number(text: str) -> str | None:
    """Return a canonical string for a number ("1,234.50" -> "1234.5", "18.00" -> "18"), or None."""
    cleaned = text.replace(",", "").strip().rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def gsm8k_reference_answer(solution: str) -> str | None:
    """Return the normalized number after '####' in a GSM8K reference solution, or None."""
    if GSM8K_ANSWER_MARK not in solution:
        return None
    tail = solution.rsplit(GSM8K_ANSWER_MARK, 1)[1]
    match = _NUMBER.search(tail)
    return normalize_number(match.group(0)) if match else None


def last_number(text: str) -> str | None:
    """Return the normalized last number in free text (a model's solution), or None."""
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def strip_calculator_annotations(solution: str) -> str:
    """Remove GSM8K's '<<expression=result>>' annotations from a reference solution."""
    return _CALCULATOR.sub("", solution)


# -- summaries --------------------------------------------------------------------------

# Per-cell fields that `summarize` averages. Each mean keeps the name of its field.
MEAN_FIELDS = (
    "bits_per_element",
    "file_bits_per_element",
    "card_bytes",
    "export_ms",
    "measure_ms",
    "kl_mean",
    "kl_fresh",
    "kl_floor",
    "top1",
    "gen_agree_tokens",
    "gen_agree_fraction",
    "loglik_delta",
    "correct",
    "ref_correct",
)


def mean_or_none(values: Iterable[Any]) -> float | None:
    """Return the mean of the values that are neither None nor NaN, or None when no value is left."""
    numbers = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(numbers) / len(numbers) if numbers else None


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Average the measured cells per (controller, budget, hop), in first-seen order.

    Cells whose status is not 'ok' are counted in `n_skipped` and left out of the means.
    Each returned dict holds `n_contexts`, `n_skipped`, the mean of every field of
    `MEAN_FIELDS` (None when no cell has a value) and `kl_max`, the largest mean KL
    of one cell.
    """
    groups: dict[tuple[str, float, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["controller"], float(row["budget"]), int(row["hop"])), []).append(row)
    out = []
    for (controller, budget, hop), cells in groups.items():
        ok = [c for c in cells if c["status"] == "ok"]
        entry: dict[str, Any] = {
            "controller": controller,
            "budget": budget,
            "hop": hop,
            "n_contexts": len(ok),
            "n_skipped": len(cells) - len(ok),
        }
        for name in MEAN_FIELDS:
            entry[name] = mean_or_none(c.get(name) for c in ok)
        kls = [c["kl_mean"] for c in ok if c.get("kl_mean") is not None]
        entry["kl_max"] = max(kls) if kls else None
        out.append(entry)
    return out


def nudged_card(card: CacheCard, seed: int = 0) -> CacheCard:
    """Return a copy of a lossless card with every K/V element moved one f16 step up or down at random.

    Its KL against the lossless card is the noise floor of the backend: llama.cpp
    rounds activations (to 8 bits for quantized weights, to f16 for f16 K/V), so any
    change of the cache, however small, draws new rounding errors downstream. No
    card's KL can be distinguished from this floor or go below it.

    Raises:
        ValueError: when the card is not lossless (every row f16, keys by row).
    """
    import dataclasses

    from .card import CardSection
    from .codec import LOSSLESS_WIDTH

    if card.k_layout != "row" or any(
        np.any(bits != LOSSLESS_WIDTH)
        for section in card.sections
        for layer in section.layers
        for bits in (layer.k_bits, layer.v_bits)
    ):
        raise ValueError("nudged_card needs a lossless card (every row f16, keys by row); export the card at budget 16")
    rng = np.random.default_rng(seed)

    def nudge(codes: np.ndarray) -> np.ndarray:
        halves = codes.view(np.uint16)
        sign, magnitude = halves & 0x8000, (halves & 0x7FFF).astype(np.int32)
        # One step away from the value, never into infinity or NaN (0x7BFF is the largest finite half).
        magnitude = np.clip(magnitude + rng.choice((-1, 1), size=magnitude.shape), 0, 0x7BFF)
        return (sign | magnitude.astype(np.uint16)).view(np.uint8)

    sections = [
        CardSection(
            section.positions,
            [
                dataclasses.replace(layer, k_codes=nudge(layer.k_codes), v_codes=nudge(layer.v_codes))
                for layer in section.layers
            ],
        )
        for section in card.sections
    ]
    return dataclasses.replace(card, sections=sections, sha256="", signature_status="unsigned")
