"""Per-layer sensitivity: how much each cache layer's keys and values matter to the output.

Measured once per model. For every layer of every cache section, and for K
and V apart, `measure` makes a card where only that part is quantized to
`probe_bits` (every other row stays f16). It records the KL divergence of
the receiver's next-token distributions against the lossless card.
On Gemma 3 270M (its F32 copy, README text) 2-bit keys of one layer cost
0.003 to 0.07 nats, 2-bit values 0.0004 to 0.009 (`docs/quality.md`).

`export_card` turns a table into row weights: a row of layer l gets
KL_l / n_rows_l, the layer's share of the divergence per row, times the
controller's score normalized to a mean of 1 within the layer. Tables for
registered models ship in `qkvshare_edge/models/sensitivity/<model_id>.json`;
`qkvedge calibrate` writes one for any model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import codec
from .card import CacheCard, CardLayer, CardSection
from .quality_metrics import kl_per_position, nudged_card, reference_log_probs

if TYPE_CHECKING:
    from .llama import Llama

logger = logging.getLogger(__name__)

TABLE_VERSION = 1
BUNDLED_DIR = Path(__file__).parent / "models" / "sensitivity"
# A layer measured as (nearly) insensitive still gets this share of the mean
# sensitivity, so noise in the measurement does not starve it.
SENSITIVITY_FLOOR = 0.02


@dataclass
class LayerSensitivity:
    """KL at `probe_bits` of each (section, layer, K or V), for one model."""

    model_id: str
    probe_bits: int
    # sections[s][j] = {"k": KL, "v": KL, "n_rows": rows measured}
    sections: list[list[dict[str, float]]]
    notes: dict[str, Any] = field(default_factory=dict)

    def matches(self, n_layers: Sequence[int]) -> bool:
        """True when the table has the given number of layers per section."""
        return [len(s) for s in self.sections] == list(n_layers)

    def row_weights(self) -> list[list[tuple[float, float]]]:
        """Per section and layer, the (K, V) weight of one row: KL / n_rows, floored."""
        values = [e[p] / max(1.0, e["n_rows"]) for s in self.sections for e in s for p in ("k", "v")]
        floor = SENSITIVITY_FLOOR * float(np.mean(values)) if values else 0.0
        return [
            [(max(e["k"] / max(1.0, e["n_rows"]), floor), max(e["v"] / max(1.0, e["n_rows"]), floor)) for e in s]
            for s in self.sections
        ]

    def to_json(self) -> str:
        data = {
            "version": TABLE_VERSION,
            "model_id": self.model_id,
            "probe_bits": self.probe_bits,
            "sections": self.sections,
            "notes": self.notes,
        }
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "sensitivity table") -> LayerSensitivity:
        """Parse a table; raise ValueError naming the fault."""
        try:
            data = json.loads(text)
            if data.get("version") != TABLE_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {TABLE_VERSION}")
            sections = [
                [{"k": float(e["k"]), "v": float(e["v"]), "n_rows": float(e["n_rows"])} for e in s]
                for s in data["sections"]
            ]
            if not sections or any(not s for s in sections):
                raise ValueError("no layers")
            if any(not np.isfinite(x) or x < 0 for s in sections for e in s for x in e.values()):
                raise ValueError("a value is negative or not finite")
            return cls(str(data["model_id"]), int(data["probe_bits"]), sections, dict(data.get("notes", {})))
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{source} is not a valid sensitivity table: {exc!r}") from exc
        except ValueError as exc:
            raise ValueError(f"{source} is not a valid sensitivity table: {exc}") from exc

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LayerSensitivity:
        """Read a table; raise FileNotFoundError or ValueError naming the file."""
        path = Path(path)
        return cls.from_json(path.read_text(encoding="utf-8"), str(path))


def bundled(model_id: str) -> LayerSensitivity | None:
    """Return the table shipped for `model_id`, or None."""
    path = BUNDLED_DIR / f"{model_id}.json"
    if not path.is_file():
        return None
    table = LayerSensitivity.load(path)
    if table.model_id != model_id:
        logger.warning("%s names model %s; ignoring it", path, table.model_id)
        return None
    return table


def _with_one_part_quantized(base: CacheCard, s: int, j: int, part: str, bits: int, k_block: int) -> CacheCard:
    """Return a copy of the lossless `base` where only layer j of section s, K or V, is stored at `bits`."""
    sections = []
    for si, section in enumerate(base.sections):
        layers = list(section.layers)
        if si == s:
            layer = layers[j]
            k, v = base.decode_layer(si, j)
            width = np.full(section.n_cells, bits, dtype=np.uint8)
            if part == "k":
                codes = codec.encode_channel(k, width, section.positions, k_block)
                layers[j] = CardLayer(layer.n_embd_k, layer.n_embd_v, width, codes, layer.v_bits, layer.v_codes)
            else:
                codes = codec.encode(v, width, base.group_size, 0, base.rotation_chunk)
                layers[j] = CardLayer(layer.n_embd_k, layer.n_embd_v, layer.k_bits, layer.k_codes, width, codes)
        sections.append(CardSection(section.positions, layers))
    card = CacheCard(
        model=base.model,
        token_ids=base.token_ids,
        positions=base.positions,
        sections=sections,
        group_size=base.group_size,
        provenance=base.provenance,
        rotation_chunk=base.rotation_chunk,
        # All-f16 key blocks store plain f16 rows, so the lossless keys read the same in the channel layout.
        k_layout="channel",
        k_block=k_block,
        rope_freq_base=base.rope_freq_base,
        rope_freq_scale=base.rope_freq_scale,
    )
    return card


def measure(
    sender: Llama,
    receiver: Llama,
    contexts: Sequence[tuple[list[int], list[int]]],
    *,
    probe_bits: int = 2,
    k_block: int = 128,
    progress: Callable[[str], None] | None = None,
) -> LayerSensitivity:
    """Measure the table on (context tokens, continuation tokens) pairs.

    `receiver` must be created with logits_all=True and room for a context
    plus its continuation. Runs 2 + 2 * n_layers imports per context.

    The table's notes record the noise floor: the mean KL of the lossless
    card with every element moved one f16 step (`nudged_card`). On a model
    with quantized weights any change of the cache costs about that much
    (0.0078 nats on Gemma 3 270M Q4_K_M and the README text), so entries
    near the floor are noise. Subtracting it left zeros that starved those
    layers (KL 0.0105 against 0.0093 at budget 4 on license text,
    docs/quality-results/sensitivity/), so the entries are kept as measured.
    The table shipped for that model was measured on its F32 copy
    (`gemma3-270m-f32`, floor 0.000004).
    """
    if probe_bits not in codec.WIDTHS or probe_bits == codec.LOSSLESS_WIDTH:
        raise ValueError(f"probe_bits must be one of {codec.WIDTHS[:-1]}, got {probe_bits}")
    totals: list[list[dict[str, float]]] | None = None
    floors: list[float] = []
    for context, follow in contexts:
        sender.clear_cache()
        sender.eval(context)
        base = sender.export_card(budget=16.0, controller="uniform")

        def continuation_logits(card: CacheCard, follow: list[int] = follow) -> np.ndarray:
            receiver.import_card(card, replace=True)
            receiver.eval(follow)
            # Row i is the distribution after follow[i]; an import computes no logits for the card's last token.
            n = card.n_tokens
            return np.array(receiver.scores[n : n + len(follow)], dtype=np.float64)

        reference = reference_log_probs(continuation_logits(base))
        noise_floor = max(0.0, float(kl_per_position(reference, continuation_logits(nudged_card(base))).mean()))
        floors.append(noise_floor)
        if progress is not None:
            progress(f"noise floor: KL {noise_floor:.5f}")
        if totals is None:
            totals = [[{"k": 0.0, "v": 0.0, "n_rows": 0.0} for _ in s.layers] for s in base.sections]
        for s, section in enumerate(base.sections):
            for j in range(len(section.layers)):
                for part in ("k", "v"):
                    card = _with_one_part_quantized(base, s, j, part, probe_bits, k_block)
                    kl = float(kl_per_position(reference, continuation_logits(card)).mean())
                    if not np.isfinite(kl):
                        where = f"section {s} layer {j} {part.upper()}"
                        raise RuntimeError(f"KL of {where} is {kl}: the receiver's logits are invalid")
                    # Rounding can leave a KL of an unchanged distribution slightly below 0.
                    totals[s][j][part] += max(0.0, kl) / len(contexts)
                    if progress is not None:
                        progress(f"section {s} layer {j} {part.upper()}: KL {kl:.5f}")
                totals[s][j]["n_rows"] += section.n_cells / len(contexts)
    assert totals is not None
    return LayerSensitivity(
        sender.fingerprint.model_id, probe_bits, totals, {"noise_floor": round(float(np.mean(floors)), 6)}
    )
