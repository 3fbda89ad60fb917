"""Exceptions raised by qkvshare_edge.

Every error is a subclass of `QKVShareError`, and of the builtin exception
a caller would catch for that kind of fault (`ValueError` for bad input,
`RuntimeError` for a failed llama.cpp call), so `except ValueError` keeps
working for code written against llama-cpp-python.
"""

from __future__ import annotations


class QKVShareError(Exception):
    """Base class of every error raised by qkvshare_edge."""


class CardFormatError(QKVShareError, ValueError):
    """The card file is not a valid CacheCard (truncated, corrupt, wrong version)."""


class CardChecksumError(CardFormatError):
    """A card section does not match its recorded checksum."""


class ModelMismatchError(QKVShareError, ValueError):
    """The card was made by a different model than the receiving context's."""


class ContextTooSmallError(QKVShareError, ValueError):
    """The receiving context has no room for the card's tokens."""


class SequenceNotEmptyError(QKVShareError, ValueError):
    """The target sequence already contains tokens and replacing them was not requested."""


class BudgetError(QKVShareError, ValueError):
    """The bit budget cannot be met or is out of range."""


class StateFormatError(QKVShareError, ValueError):
    """A llama.cpp sequence state does not have the layout this version expects."""


class ImportFailedError(QKVShareError, RuntimeError):
    """llama.cpp rejected the rebuilt state; the receiver was restored to its previous state."""


class CardSignatureError(QKVShareError, ValueError):
    """A card's HMAC signature is missing where required, or does not verify with the key."""
