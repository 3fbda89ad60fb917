"""atheris fuzz target: the llama.cpp sequence-state parser (`state.parse_seq_state`).

Any input may be rejected, but only with StateFormatError.

Run: python fuzz/fuzz_state.py fuzz/corpus/state -max_total_time=60
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from qkvshare_edge import state
    from qkvshare_edge.errors import StateFormatError

LAYOUTS = [
    state.CacheLayout(type_k=1, type_v=1, v_trans=True, k_rot_chunk=0, v_rot_chunk=0),
    state.CacheLayout(type_k=8, type_v=8, v_trans=False, k_rot_chunk=64, v_rot_chunk=64),
]


def test_one_input(data: bytes) -> None:
    layout = LAYOUTS[len(data) % 2]
    try:
        state.parse_seq_state(data, layout, n_threads=1)
    except StateFormatError:
        return


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
