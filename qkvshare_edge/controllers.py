"""Importance controllers: per-token scores that steer the bit allocation.

A controller maps the K/V of every cache layer to one non-negative score
per row (token) for K and one for V. The allocator (`allocation.py`) gives
more bits to rows with higher scores. Scores are relative within one card:
multiplying every score by a constant changes nothing.

Controllers are looked up by name in `CONTROLLERS`, an explicit registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LayerView:
    """The input of a controller for one layer of one cache section."""

    positions: np.ndarray  # (n_rows,) int32, ascending
    keys: np.ndarray  # (n_rows, n_embd_k_gqa) float32
    values: np.ndarray  # (n_rows, n_embd_v_gqa) float32
    n_tokens: int  # tokens in the whole sequence (the full-attention section's length)
    # (n_rows,) attention each row receives from recent queries (1.0: as much as
    # uniform attention would give), for controllers with `needs_attention`;
    # None when no queries were recorded for this layer.
    attention: np.ndarray | None = field(default=None)


# (layer) -> (key scores (n_rows,), value scores (n_rows,)), float64, >= 0.
Controller = Callable[[LayerView], tuple[np.ndarray, np.ndarray]]

# sink-recent: how many leading tokens count as attention sinks, and the share
# of the sequence (at least SINK_RECENT_MIN_RECENT tokens) that counts as recent.
# With a floor of 32 recent tokens, half of a 64-token GSM8K question was
# boosted and its KL at budget 4 was 2.3x uniform's. With the floor of 8 it
# is 0.85x uniform's on the first 150 GSM8K problems (docs/quality.md).
SINK_RECENT_N_SINK = 4
SINK_RECENT_RECENT_FRACTION = 0.05
SINK_RECENT_MIN_RECENT = 8
# Score of sink and recent tokens relative to 1.0 for the rest: 16 moves them
# about two widths up (e.g. 8 bits where the rest gets 3 or 4).
SINK_RECENT_BOOST = 16.0


def uniform(layer: LayerView) -> tuple[np.ndarray, np.ndarray]:
    """Give every token the same score, so every row gets (nearly) the same width."""
    ones = np.ones(layer.positions.shape[0], dtype=np.float64)
    return ones, ones.copy()


def sink_recent(layer: LayerView) -> tuple[np.ndarray, np.ndarray]:
    """Score the first tokens (attention sinks) and the most recent ones higher than the middle."""
    n_recent = max(SINK_RECENT_MIN_RECENT, int(SINK_RECENT_RECENT_FRACTION * layer.n_tokens))
    last = layer.n_tokens - 1
    boosted = (layer.positions < SINK_RECENT_N_SINK) | (layer.positions > last - n_recent)
    scores = np.where(boosted, SINK_RECENT_BOOST, 1.0)
    return scores, scores.copy()


def key_norm(layer: LayerView) -> tuple[np.ndarray, np.ndarray]:
    """Score each token by the squared L2 norm of its key row, relative to the layer mean.

    Keys with a large norm produce large attention logits, so their errors
    move the softmax most. The token's value row gets the same score.
    """
    norms = np.einsum("ij,ij->i", layer.keys, layer.keys, dtype=np.float64)
    mean = float(norms.mean()) if norms.size else 0.0
    scores = norms / mean if mean > 0 else np.ones_like(norms)
    return scores, scores.copy()


# attention: score = ATTENTION_FLOOR + normalized attention. The floor keeps
# tokens that recent queries ignore from dropping to the narrowest width at
# once, since later queries may attend to them.
ATTENTION_FLOOR = 0.25


def attention(layer: LayerView) -> tuple[np.ndarray, np.ndarray]:
    """Score each token by the attention the most recent queries give it in this layer.

    The signal is recorded while decoding (see `attention.py`): the last
    queries of each layer after RoPE, whose softmax over the cached keys is
    recomputed at export. Without recorded queries (a context created with
    attention_window=0, or a sequence imported and not decoded since) it
    falls back to `key_norm`.
    """
    if layer.attention is None:
        return key_norm(layer)
    scores = ATTENTION_FLOOR + np.asarray(layer.attention, dtype=np.float64)
    return scores, scores.copy()


# Tells export_card to compute LayerView.attention for this controller.
attention.needs_attention = True  # type: ignore[attr-defined]


CONTROLLERS: dict[str, Controller] = {
    "uniform": uniform,
    "sink-recent": sink_recent,
    "key-norm": key_norm,
    "attention": attention,
}
DEFAULT_CONTROLLER = "attention"


def get_controller(name: str) -> Controller:
    """Return the controller registered under `name`.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    try:
        return CONTROLLERS[name]
    except KeyError:
        known = ", ".join(sorted(CONTROLLERS))
        raise ValueError(f"unknown controller {name!r}; choose one of: {known}") from None
