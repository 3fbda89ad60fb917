"""Attention saliency: which cached tokens recent queries attend to.

`AttentionRecorder` hooks llama.cpp's eval callback (the `cb_eval` context
parameter) with a native observer that keeps, per layer, the last `window`
query rows and key rows after RoPE ("Qcur-<il>" and "Kcur-<il>"). The
callback receives them with flash attention on or off, because both are
computed before the attention itself. The Python side logs which (sequence, position) each
decoded row belongs to.

At export, `attention_scores` recomputes the softmax of those queries over
every cached key of the sequence (numpy, float32). It turns that into one
score per token: the attention the token receives, averaged over queries and
heads. Each query's weights are multiplied by the number of keys in its
view, so a token is not favoured just because more queries can reach it (a
query that attends uniformly gives every visible token 1). On Gemma 3 270M
with a 1024-token context and 32 queries, the scoring stage of an export
took 18 ms against 1.5 ms for `uniform` (1 thread, idle 2-core AMD EPYC).

Cost while decoding: the callback copies `window` rows per layer and ubatch
and splits the graph at the observed nodes.
"""

from __future__ import annotations

import ctypes
import logging
from collections import deque
from dataclasses import dataclass

import llama_cpp
import numpy as np
from llama_cpp import llama_cpp as llama_lib

from . import _native

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = 32
_GGML_FUNCTIONS = (
    "ggml_get_name",
    "ggml_op_desc",
    "ggml_nelements",
    "ggml_nbytes",
    "ggml_is_contiguous",
    "ggml_backend_tensor_get",
)


@dataclass
class LayerQueries:
    """Recent queries of one model layer for one sequence, with the keys decoded beside them."""

    layer: int  # model layer index
    positions: np.ndarray  # (n_q,) int32 positions of the queries, ascending
    queries: np.ndarray  # (n_q, n_embd_q) float32, after RoPE
    keys: np.ndarray  # (n_q, n_embd_k) float32, after RoPE, as written to the cache


class AttentionRecorder:
    """Keeps the last `window` query and key rows per layer of a llama.cpp context.

    Attach it to context parameters before the context is created; log every
    decode with `record_batch` before it runs.
    """

    def __init__(self, n_layer: int, n_embd_q: int, n_embd_k: int, window: int = DEFAULT_WINDOW) -> None:
        functions = {
            name: ctypes.cast(getattr(llama_lib._lib, name), ctypes.c_void_p).value for name in _GGML_FUNCTIONS
        }
        self._probe = _native.AttentionProbe(functions, n_layer, n_embd_q, n_embd_k, window)
        self._probe.enabled = True
        self.window = window
        self.n_layer = n_layer
        # (seq_id, position) of the last `window` rows, in decode order.
        self._rows: deque[tuple[int, int]] = deque(maxlen=window)
        self._n_recorded = 0
        # Kept alive while the context may call it.
        self._callback = ctypes.cast(
            _native.AttentionProbe.callback_address, llama_cpp.ggml_backend_sched_eval_callback
        )

    def attach(self, params: llama_cpp.llama_context_params) -> None:
        """Set the eval callback of `params`; the context created from them reports to this recorder."""
        params.cb_eval = self._callback
        params.cb_eval_user_data = ctypes.c_void_p(self._probe.address)

    def record_batch(self, seq_id: int, start: int, n_tokens: int) -> None:
        """Log a decode of `n_tokens` rows of `seq_id` at positions start.. (call before llama_decode)."""
        first = max(0, n_tokens - self.window)
        self._rows.extend((seq_id, start + i) for i in range(first, n_tokens))
        self._n_recorded += n_tokens

    def reset(self) -> None:
        self._probe.reset()
        self._rows.clear()
        self._n_recorded = 0

    def layers(self, seq_id: int, n_positions: int) -> list[LayerQueries] | None:
        """Return the kept rows of `seq_id` at positions below `n_positions`, per model layer.

        Returns None when nothing was kept for the sequence. Also returns None
        when the rows captured do not match the decodes logged (a decode
        outside this wrapper, or a failed one), and the recorder starts over.
        """
        error = self._probe.error
        totals = {self._probe.total(il, keys) for il in range(self.n_layer) for keys in (False, True)}
        if error or totals != {self._n_recorded}:
            logger.info(
                "attention rows do not match the decodes logged (%s; rows %s, logged %d); starting over",
                error or "counts differ",
                sorted(totals),
                self._n_recorded,
            )
            self.reset()
            return None
        rows = list(self._rows)
        # The latest row of each position wins: positions decoded again replace older rows.
        latest: dict[int, int] = {}
        for i, (seq, pos) in enumerate(rows):
            if seq == seq_id and pos < n_positions:
                latest[pos] = i
        if not latest:
            return None
        positions = np.array(sorted(latest), dtype=np.int32)
        index = np.array([latest[int(p)] for p in positions], dtype=np.int64)
        # The probe's rows are the last len(rows) decoded, oldest first.
        out = []
        for il in range(self.n_layer):
            queries = self._probe.rows(il, False)
            keys = self._probe.rows(il, True)
            offset = queries.shape[0] - len(rows)
            out.append(LayerQueries(il, positions, queries[offset + index], keys[offset + index]))
        return out


def match_layers(recorded: list[LayerQueries], positions: np.ndarray, keys: list[np.ndarray]) -> list[int | None]:
    """Map each cache layer of a section to the model layer whose recorded keys it contains.

    `keys[j]` is layer j's K (n_cells, n_embd_k) at `positions`. The cache
    stores exactly the keys the model computed (rounded to the cache type),
    so the model layer with the nearest recorded key row at a shared
    position is the one; None where no position is shared.
    """
    if not recorded:
        return [None] * len(keys)
    shared = np.intersect1d(positions, recorded[0].positions)
    if shared.size == 0:
        return [None] * len(keys)
    p = int(shared[-1])
    row = int(np.searchsorted(positions, p))
    rec_row = int(np.searchsorted(recorded[0].positions, p))
    candidates = np.stack([r.keys[rec_row] for r in recorded])  # (n_layer, n_embd_k)
    out: list[int | None] = []
    for k in keys:
        if k.shape[1] != candidates.shape[1]:
            out.append(None)
            continue
        distance = np.sum((candidates - k[row]) ** 2, axis=1)
        out.append(int(np.argmin(distance)))
    return out


def attention_scores(
    queries: np.ndarray,
    query_positions: np.ndarray,
    keys: np.ndarray,
    key_positions: np.ndarray,
    n_head: int,
    window: int = 0,
) -> np.ndarray:
    """Return each key row's normalized attention from the queries (mean over queries and heads).

    Args:
        queries: (n_q, n_head * head_dim) float32, after RoPE.
        query_positions: (n_q,) positions of the queries.
        keys: (n_k, n_head_kv * head_dim) float32, after RoPE.
        key_positions: (n_k,) positions of the keys.
        n_head: query heads; n_head_kv follows from the row sizes (grouped-query attention).
        window: sliding-window size of the layer, 0 for full (causal) attention.

    Returns:
        (n_k,) float64, 1.0 for a token that every query attends to as much as to any other.
    """
    head_dim = queries.shape[1] // n_head
    n_head_kv = keys.shape[1] // head_dim
    group = n_head // n_head_kv
    q = queries.reshape(queries.shape[0], n_head, head_dim)
    k = keys.reshape(keys.shape[0], n_head_kv, head_dim)
    distance = query_positions[:, None].astype(np.int64) - key_positions[None, :].astype(np.int64)
    visible = distance >= 0
    if window > 0:
        visible &= distance < window
    # A query with none of these keys in its view (a window cache that no longer
    # contains its cells) gives no information about them.
    sees = visible.any(axis=1)
    q, visible = q[sees], visible[sees]
    # Keys outside every query's view (the older cells of a window layer) score 0
    # without entering the products.
    seen_keys = np.flatnonzero(visible.any(axis=0))
    k, visible = k[seen_keys], visible[:, seen_keys]
    n_visible = visible.sum(axis=1, keepdims=True)
    total = np.zeros(seen_keys.shape[0], dtype=np.float64)
    scale = np.float32(1.0 / np.sqrt(head_dim))
    for h in range(n_head):
        logits = (q[:, h] @ k[:, h // group].T) * scale
        logits = np.where(visible, logits, -np.inf)
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        weights /= weights.sum(axis=1, keepdims=True)
        total += (weights * n_visible).sum(axis=0)
    scores = np.zeros(keys.shape[0], dtype=np.float64)
    scores[seen_keys] = total / (n_head * np.maximum(visible.sum(axis=0), 1))
    return scores
