"""KL of tiny changes of a lossless cache: the noise floor of the backend.

For each context, the sender's f16 K/V cache is read, changed as listed, and
written into a receiver, which then decodes the 64-token continuation. The
KL is taken against the same receiver with the unchanged cache. Changes:

- rebuilt: the cache parsed and written back unchanged (must give 0);
- K +-1 step, V +-1 step: every key (value) element moved by -1, 0 or +1
  f16 steps, drawn uniformly, so about two thirds of them change;
- K +-4 steps: every key element moved by -4 to +4 f16 steps, drawn uniformly;
- card at budget 8: a budget-8 card of the sender, imported.

    python docs/quality-results/scripts/noise_floor.py --model gemma3-270m --text /tmp/licenses.txt
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
from common import add_arguments, context_options, load_items

from qkvshare_edge import Llama, handoff, state
from qkvshare_edge.quality_metrics import kl_per_position, reference_log_probs

# 0x7BFF is the largest finite f16 magnitude.
MAX_HALF = 0x7BFF


def load_state(receiver: Llama, sender: Llama, blob: bytes) -> None:
    """Write a sequence state of the sender's tokens into the receiver's sequence 0."""
    receiver.clear_cache()
    if not state.write_seq_state(receiver.ctx, 0, blob):
        raise RuntimeError("llama.cpp did not read the whole state")
    receiver.n_tokens = sender.n_tokens
    receiver.input_ids[: sender.n_tokens] = sender.input_ids[: sender.n_tokens]


def changed_state(
    sections: list[state.StateSection],
    layout: state.CacheLayout,
    change_k: Callable[[np.ndarray], np.ndarray],
    change_v: Callable[[np.ndarray], np.ndarray],
) -> bytes:
    """Build a state buffer from parsed sections with every layer's K and V changed."""
    rebuilt = [
        (s.n_stream, s.stream, s.pos, [(change_k(layer.k), change_v(layer.v)) for layer in s.layers]) for s in sections
    ]
    return state.build_seq_state(rebuilt, 0, layout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, n_contexts=2, threads=2)
    args = parser.parse_args()

    path, items = load_items(args)
    options = context_options(args.context_tokens + 256, args.threads)
    sender = Llama(path, **options)
    receiver = Llama(path, logits_all=True, **options)
    rng = np.random.default_rng(0)

    def nudge(steps: int) -> Callable[[np.ndarray], np.ndarray]:
        def apply(x: np.ndarray) -> np.ndarray:
            halves = x.astype(np.float16).view(np.uint16).astype(np.int32)
            sign, magnitude = halves & 0x8000, halves & 0x7FFF
            magnitude = np.clip(magnitude + rng.integers(-steps, steps + 1, size=halves.shape), 0, MAX_HALF)
            return (sign | magnitude).astype(np.uint16).view(np.float16).astype(np.float32)

        return apply

    def unchanged(x: np.ndarray) -> np.ndarray:
        return x

    def continuation_logits(n_tokens: int, follow: list[int]) -> np.ndarray:
        receiver.eval(follow)
        return np.array(receiver.scores[n_tokens : n_tokens + len(follow)], dtype=np.float64)

    results: dict[str, list[float]] = {}
    for item in items:
        sender.clear_cache()
        sender.eval(item.context)
        n_tokens = sender.n_tokens
        layout = handoff.context_layout(sender)
        blob = state.read_seq_state(sender.ctx, 0)
        sections = state.parse_seq_state(blob, layout)

        load_state(receiver, sender, blob)
        reference = reference_log_probs(continuation_logits(n_tokens, item.follow))
        for name, change_k, change_v in (
            ("rebuilt", unchanged, unchanged),
            ("K +-1 step", nudge(1), unchanged),
            ("V +-1 step", unchanged, nudge(1)),
            ("K +-4 steps", nudge(4), unchanged),
        ):
            load_state(receiver, sender, changed_state(sections, layout, change_k, change_v))
            kl = kl_per_position(reference, continuation_logits(n_tokens, item.follow))
            results.setdefault(name, []).append(float(kl.mean()))
        receiver.import_card(sender.export_card(budget=8.0), replace=True)
        kl = kl_per_position(reference, continuation_logits(n_tokens, item.follow))
        results.setdefault("card at budget 8", []).append(float(kl.mean()))

    print(f"model {args.model}, {len(items)} contexts of {args.context_tokens} tokens, mean KL over 64 positions\n")
    print("| change | " + " | ".join(f"context {i}" for i in range(len(items))) + " | mean |")
    print("|---" * (len(items) + 2) + "|")
    for name, values in results.items():
        print(f"| {name} | " + " | ".join(f"{v:.6f}" for v in values) + f" | {np.mean(values):.6f} |")


if __name__ == "__main__":
    main()
