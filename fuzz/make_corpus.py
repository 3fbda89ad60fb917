"""Write the fuzzers' seed corpus: small valid cards and llama.cpp state buffers from the tiny models.

Run: python fuzz/make_corpus.py [OUT_DIR]  (default: fuzz/corpus next to this file)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from qkvshare_edge import Llama, state
from qkvshare_edge.models import write_tiny_gemma3, write_tiny_llama

TEXT = b"The ferry leaves the harbor at seven with mail and bread for the island."


def main(out: Path) -> None:
    (out / "card").mkdir(parents=True, exist_ok=True)
    (out / "state").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            "llama": write_tiny_llama(Path(tmp) / "llama.gguf", seed=0),
            "gemma3": write_tiny_gemma3(Path(tmp) / "gemma3.gguf", seed=0, sliding_window=8),
        }
        for name, path in models.items():
            for flash_attn in (False, True):
                llm = Llama(str(path), n_ctx=256, n_threads=1, flash_attn=flash_attn, verbose=False)
                tokens = llm.tokenize(TEXT)[:12]
                llm.eval(tokens)
                tag = f"{name}-{'fa' if flash_attn else 'nofa'}"
                (out / "state" / f"{tag}.bin").write_bytes(state.read_seq_state(llm.ctx, 0))
                # Format version 1 (keys by row, and lossless) and version 2 (keys by channel).
                for budget, k_layout in ((3.5, "row"), (16.0, "row"), (8.0, "channel")):
                    card = llm.export_card(budget=budget, group_size=32, k_layout=k_layout, k_block=8)
                    (out / "card" / f"{tag}-b{budget:g}-{k_layout}.qkvc").write_bytes(card.to_bytes())
                llm.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "corpus")
