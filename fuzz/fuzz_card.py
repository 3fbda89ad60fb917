"""atheris fuzz target: the card reader (`CacheCard.from_bytes`).

Any input may be rejected, but only with CardFormatError (or its
subclasses); any other exception, a hang or a crash is a finding.

Run: python fuzz/fuzz_card.py fuzz/corpus/card -max_total_time=60
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import gguf  # noqa: F401  (instrumented: the reader runs inside it)

    from qkvshare_edge.card import CacheCard
    from qkvshare_edge.errors import CardFormatError, CardSignatureError

KEY = b"fuzzing-key-0123456789"


def test_one_input(data: bytes) -> None:
    try:
        card = CacheCard.from_bytes(data, key=KEY)
    except (CardFormatError, CardSignatureError):
        return
    # A card that loads must also decode.
    for s, section in enumerate(card.sections):
        for j in range(len(section.layers)):
            card.decode_layer(s, j, n_threads=1)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
