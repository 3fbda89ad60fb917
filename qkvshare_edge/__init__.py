"""qkvshare_edge: hand a llama.cpp KV cache from one agent to another as a CacheCard."""

from __future__ import annotations

__version__ = "0.3.0"

from .card import CacheCard
from .errors import (
    BudgetError,
    CardChecksumError,
    CardFormatError,
    CardSignatureError,
    ContextTooSmallError,
    ImportFailedError,
    ModelMismatchError,
    QKVShareError,
    SequenceNotEmptyError,
    StateFormatError,
)
from .llama import Llama

__all__ = [
    "BudgetError",
    "CacheCard",
    "CardChecksumError",
    "CardFormatError",
    "CardSignatureError",
    "ContextTooSmallError",
    "ImportFailedError",
    "Llama",
    "ModelMismatchError",
    "QKVShareError",
    "SequenceNotEmptyError",
    "StateFormatError",
    "__version__",
]
