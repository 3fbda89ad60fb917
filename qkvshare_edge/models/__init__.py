"""Models that qkvshare_edge can run: a registry of named models and tiny test models."""

from qkvshare_edge.models.registry import (
    DEFAULT_MODEL,
    ModelEntry,
    cache_dir,
    list_models,
    resolve_model,
)
from qkvshare_edge.models.tiny import (
    TINY_MODEL_VERSION,
    build_tiny_vocab,
    gemma3_swa_layers,
    write_tiny_gemma3,
    write_tiny_llama,
)

__all__ = [
    "DEFAULT_MODEL",
    "TINY_MODEL_VERSION",
    "ModelEntry",
    "build_tiny_vocab",
    "cache_dir",
    "gemma3_swa_layers",
    "list_models",
    "resolve_model",
    "write_tiny_gemma3",
    "write_tiny_llama",
]
