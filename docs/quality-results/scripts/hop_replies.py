"""The replies that the lossless chain of `qkvedge eval quality` appends at each hop.

Runs the harness's lossless chain (per hop the agent note and a 16-token
greedy reply, end of text banned) on each text context and prints, per
context, how many different replies hops 2 to H appended, and each of them.

    python docs/quality-results/scripts/hop_replies.py --model gemma3-270m-f32 --text /tmp/licenses.txt
"""

from __future__ import annotations

import argparse

from common import LosslessChain, add_arguments, context_options, load_items

from qkvshare_edge import Llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, n_contexts=4, threads=1)
    parser.add_argument("--hops", type=int, default=8)
    args = parser.parse_args()

    path, items = load_items(args)
    options = context_options(args.context_tokens + 64 * args.hops, args.threads)
    sender, worker = Llama(path, **options), Llama(path, **options)
    chain = LosslessChain(worker)
    for item in items:
        sender.clear_cache()
        sender.eval(item.context)
        lossless = sender.export_card(budget=16.0)
        replies = []
        for _ in range(2, args.hops + 1):
            lossless, appended = chain.next_hop(lossless)
            replies.append(worker.detokenize(appended[len(chain.instruction) :]).decode("utf-8", errors="replace"))
        distinct = list(dict.fromkeys(replies))
        print(f"{item.item_id}: {len(distinct)} different replies in hops 2 to {args.hops}")
        for reply in distinct:
            print(f"    {reply!r} ({replies.count(reply)} times)")


if __name__ == "__main__":
    main()
