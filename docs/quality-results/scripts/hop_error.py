"""Sources of the K/V error of a hop-H card, by kind of row.

Runs the quality harness's chain (context, then per hop the agent note and a
16-token greedy reply of the lossless chain) at one budget and controller,
and compares three hop-H caches with the lossless chain's hop-H card:

- chain: the card the quantized chain exports at hop H;
- made once: the lossless chain's hop-H context exported once at the budget;
- inherited: the quantized chain's cache at hop H before it exports, stored
  at budget 16. Its newest rows were computed by a model that attended to
  quantized rows, and were not quantized themselves.

Error of a row: squared distance to the lossless row over the layer's mean
squared lossless element, averaged over the row's elements, then over rows
of one kind and over layers. Kinds: rows of the context, rows appended by
hops 2 to H-1, rows appended by hop H.

    python docs/quality-results/scripts/hop_error.py --model gemma3-270m-f32 \\
        --text /tmp/licenses.txt --budget 3 --n-contexts 2
"""

from __future__ import annotations

import argparse

import numpy as np
from common import LosslessChain, add_arguments, context_options, load_items

from qkvshare_edge import Llama
from qkvshare_edge.card import CacheCard

KINDS = ("context", "older hops", "newest hop")


def row_errors(card: CacheCard, reference: CacheCard, n_context: int, newest_from: int) -> dict[tuple[str, str], float]:
    """Mean relative squared error per (kind of row, K or V) of `card` against `reference`."""
    per_layer: dict[tuple[str, str], list[float]] = {}
    for s, section in enumerate(reference.sections):
        pos = section.positions
        masks = {
            "context": pos < n_context,
            "older hops": (pos >= n_context) & (pos < newest_from),
            "newest hop": pos >= newest_from,
        }
        for j in range(len(section.layers)):
            got, want = card.decode_layer(s, j), reference.decode_layer(s, j)
            for part, x, y in (("K", got[0], want[0]), ("V", got[1], want[1])):
                y64 = y.astype(np.float64)
                scale = float((y64**2).mean())
                error = ((x.astype(np.float64) - y64) ** 2).mean(axis=1) / scale
                for kind, mask in masks.items():
                    if mask.any():
                        per_layer.setdefault((kind, part), []).append(float(error[mask].mean()))
    return {key: float(np.mean(values)) for key, values in per_layer.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, n_contexts=2, threads=2)
    parser.add_argument("--budget", type=float, default=3.0)
    parser.add_argument("--controller", default="attention")
    parser.add_argument("--hops", type=int, default=8)
    args = parser.parse_args()

    path, items = load_items(args)
    options = context_options(args.context_tokens + 64 * args.hops, args.threads)
    sender, worker = Llama(path, **options), Llama(path, **options)
    chain = LosslessChain(worker)
    export = {"budget": args.budget, "controller": args.controller}
    totals: dict[str, list[dict[tuple[str, str], float]]] = {"chain": [], "made once": [], "inherited": []}

    for item in items:
        sender.clear_cache()
        sender.eval(item.context)
        lossless, card = sender.export_card(budget=16.0), sender.export_card(**export)
        for hop in range(2, args.hops + 1):
            lossless, appended = chain.next_hop(lossless)
            if hop == args.hops:
                made_once = worker.export_card(**export)
            worker.clear_cache()
            worker.import_card(card)
            worker.eval(appended)
            if hop == args.hops:
                inherited = worker.export_card(budget=16.0)
            card = worker.export_card(**export)
        newest_from = lossless.n_tokens - len(appended)
        for name, got in (("chain", card), ("made once", made_once), ("inherited", inherited)):
            totals[name].append(row_errors(got, lossless, len(item.context), newest_from))

    print(f"model {args.model}, {args.controller} at budget {args.budget:g}, hop {args.hops}, {len(items)} contexts\n")
    print("| cache | " + " | ".join(f"{kind} {part}" for part in "KV" for kind in KINDS) + " |")
    print("|---" * (1 + 2 * len(KINDS)) + "|")
    for name, runs in totals.items():
        cells = [np.mean([run[(kind, part)] for run in runs]) for part in "KV" for kind in KINDS]
        print(f"| {name} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
