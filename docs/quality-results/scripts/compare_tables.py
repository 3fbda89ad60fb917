"""Mean KL at hop 1 of `attention` cards made with different sensitivity tables.

Each table file is applied to the model given, whatever model it was
measured on (its model_id is replaced). `none` exports without a table.

    python docs/quality-results/scripts/compare_tables.py --model gemma3-270m --text /tmp/licenses.txt \\
        TABLE.json OTHER.json none
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
from common import add_arguments, context_options, continuation_logits, load_items

from qkvshare_edge import Llama
from qkvshare_edge.quality_metrics import kl_per_position, reference_log_probs
from qkvshare_edge.sensitivity import LayerSensitivity

BUDGETS = (3.0, 4.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", help="table files, or none")
    add_arguments(parser, n_contexts=4, threads=2)
    args = parser.parse_args()

    path, items = load_items(args)
    options = context_options(args.context_tokens + 256, args.threads)
    sender = Llama(path, **options)
    receiver = Llama(path, logits_all=True, **options)
    tables = {
        name: None
        if name == "none"
        else dataclasses.replace(LayerSensitivity.load(name), model_id=sender.fingerprint.model_id)
        for name in args.tables
    }

    results: dict[tuple[str, float], list[float]] = {}
    for item in items:
        sender.clear_cache()
        sender.eval(item.context)
        reference = reference_log_probs(continuation_logits(receiver, sender.export_card(budget=16.0), item.follow))
        for name, table in tables.items():
            for budget in BUDGETS:
                card = sender.export_card(budget=budget, controller="attention", sensitivity=table)
                kl = kl_per_position(reference, continuation_logits(receiver, card, item.follow))
                results.setdefault((name, budget), []).append(float(kl.mean()))

    print(
        f"model {args.model}, {len(items)} contexts of {args.context_tokens} tokens, attention, "
        "mean KL over 64 positions\n"
    )
    print("| table | " + " | ".join(f"budget {b:g}" for b in BUDGETS) + " |")
    print("|---" * (len(BUDGETS) + 1) + "|")
    for name in tables:
        label = Path(name).name if name != "none" else "none"
        print(f"| {label} | " + " | ".join(f"{np.mean(results[(name, b)]):.4f}" for b in BUDGETS) + " |")


if __name__ == "__main__":
    main()
