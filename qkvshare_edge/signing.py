"""HMAC-SHA256 signatures of cards with a key shared between peers.

A signature is the HMAC-SHA256 of the card's header digest and payload
digest (`cachecard.header.sha256` and `cachecard.payload.sha256`), which
together cover every metadata key and every tensor byte of the card. It
shows that the card was made by a holder of the key and not changed since;
it does not hide the card's content, and it cannot tell one key holder
from another.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

KEY_ENV = "QKVEDGE_CARD_KEY"
MIN_KEY_BYTES = 16
_DOMAIN = b"qkvshare-cachecard-v1\x00"


def load_key(path: str | os.PathLike[str] | None = None, env: str = KEY_ENV) -> bytes | None:
    """Return the shared signing key from a file, else from an environment variable, else None.

    The file's bytes are the key (one trailing newline is dropped); the
    environment variable's UTF-8 text is the key.

    Raises:
        FileNotFoundError: when `path` is given and does not exist.
        ValueError: when the key is shorter than 16 bytes.
    """
    if path is not None:
        key_path = Path(path)
        if not key_path.is_file():
            raise FileNotFoundError(f"key file {key_path} not found")
        key = key_path.read_bytes()
        if key.endswith(b"\n"):
            key = key[:-1]
        source = f"key file {key_path}"
    else:
        text = os.environ.get(env)
        if not text:
            return None
        key = text.encode("utf-8")
        source = f"environment variable {env}"
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"{source} contains a {len(key)}-byte key, which is too short; use at least {MIN_KEY_BYTES} random bytes"
        )
    return key


def sign(key: bytes, header_sha256: str, payload_sha256: str) -> str:
    """Return the hex HMAC-SHA256 of a card's two digests."""
    message = _DOMAIN + header_sha256.encode("ascii") + b"\x00" + payload_sha256.encode("ascii")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def verify(key: bytes, header_sha256: str, payload_sha256: str, signature: str) -> bool:
    """Check a signature in constant time."""
    return hmac.compare_digest(sign(key, header_sha256, payload_sha256), signature)
