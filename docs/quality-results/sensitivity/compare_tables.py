"""Mean KL at hop 1 of `attention` cards made with different sensitivity tables.

Each table file is applied to the model given, whatever model it was
measured on (its model_id is replaced). `none` exports without a table.

    python docs/quality-results/sensitivity/compare_tables.py --model gemma3-270m --text /tmp/licenses.txt \\
        TABLE.json OTHER.json none
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from qkvshare_edge import Llama
from qkvshare_edge.card import CacheCard
from qkvshare_edge.models import resolve_model
from qkvshare_edge.quality import Tokenizer, text_items
from qkvshare_edge.quality_metrics import kl_per_position, reference_log_probs
from qkvshare_edge.sensitivity import LayerSensitivity

BUDGETS = (3.0, 4.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", help="table files, or none")
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--text", required=True)
    parser.add_argument("--n-contexts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    path = str(resolve_model(args.model))
    tokenizer = Tokenizer(path)
    with open(args.text, encoding="utf-8") as f:
        items = text_items(
            tokenizer, f.read(), n_context_tokens=1024, continuation_tokens=64, n_contexts=args.n_contexts, seed=0
        )
    tokenizer.close()
    options = {"n_ctx": 1280, "n_threads": args.threads, "n_threads_batch": args.threads, "verbose": False}
    sender = Llama(path, flash_attn=False, **options)
    receiver = Llama(path, flash_attn=False, logits_all=True, **options)
    tables = {
        name: None
        if name == "none"
        else dataclasses.replace(LayerSensitivity.load(name), model_id=sender.fingerprint.model_id)
        for name in args.tables
    }

    def continuation_logits(card: CacheCard, follow: list[int]) -> np.ndarray:
        receiver.import_card(card, replace=True)
        receiver.eval(follow)
        return np.array(receiver.scores[card.n_tokens : card.n_tokens + len(follow)], dtype=np.float64)

    results: dict[tuple[str, float], list[float]] = {}
    for item in items:
        sender.clear_cache()
        sender.eval(item.context)
        reference = reference_log_probs(continuation_logits(sender.export_card(budget=16.0), item.follow))
        for name, table in tables.items():
            for budget in BUDGETS:
                card = sender.export_card(budget=budget, controller="attention", sensitivity=table)
                kl = kl_per_position(reference, continuation_logits(card, item.follow))
                results.setdefault((name, budget), []).append(float(kl.mean()))

    print(f"model {args.model}, {len(items)} contexts of 1024 tokens, attention, mean KL over 64 positions\n")
    print("| table | " + " | ".join(f"budget {b:g}" for b in BUDGETS) + " |")
    print("|---" * (len(BUDGETS) + 1) + "|")
    for name in tables:
        label = Path(name).name if name != "none" else "none"
        print(f"| {label} | " + " | ".join(f"{np.mean(results[(name, b)]):.4f}" for b in BUDGETS) + " |")


if __name__ == "__main__":
    main()
