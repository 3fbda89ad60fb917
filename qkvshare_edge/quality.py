"""`qkvedge eval quality`: card quality against the same handoff done losslessly.

For each context (a window of a text file, or a GSM8K question) a sender
reads the tokens once and exports one card per (controller, budget) plus a
lossless budget-16 card. Each card starts a chain of handoffs: hop h
imports the card of hop h-1 into a fresh sequence, appends a fixed agent
instruction and a greedy reply, and exports the next card at the same
budget. The lossless chain generates each reply, and the quantized chains
teacher-force the same reply tokens. So every chain contains the same
tokens at every hop, and only the K/V precision differs.

At each requested hop a receiver imports the card and measures, against
the lossless chain's card of that hop: the KL divergence and top-1
agreement of the next-token distributions over a teacher-forced
continuation, the greedy generation agreement, and for GSM8K the
log-likelihood of the reference solution and the final-number accuracy.

Three contexts of the model serve every configuration: the sender (never
imports), a worker for the chains, and an evaluator with `logits_all`.
They are emptied between uses, not re-created. The metrics are defined in
`quality_metrics.py`; `docs/quality.md` describes the protocol.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from . import quality_metrics as qm
from .models import DEFAULT_MODEL

if TYPE_CHECKING:
    from .card import CacheCard
    from .llama import Llama

logger = logging.getLogger(__name__)

LOSSLESS_BUDGET = 16.0
# At budget 16 every row is f16 whatever the scores, so the cheapest controller serves.
LOSSLESS_CONTROLLER = "uniform"
# The name under which the lossless chain's cards appear in `run_item(cards=...)`.
LOSSLESS_NAME = "lossless"

# Text that each hop after the first appends before its reply (the same at every hop).
HOP_INSTRUCTION = "\n\nNote from the next agent:"
GSM8K_QUESTION_PREFIX = "Question: "
GSM8K_ANSWER_PROMPT = "\nAnswer:"
# A generated GSM8K solution ends at the first of these, at EOS, or at a completed '#### N' line.
GSM8K_STOP_STRINGS = ("\n\n", "Question:")

DEFAULT_BUDGETS = "2,3,4,5,6,8"
DEFAULT_HOPS = "1,2,4,8"
DEFAULT_CONTEXT_TOKENS = 1024
DEFAULT_CONTINUATION_TOKENS = 64
DEFAULT_GEN_CAP = 32
DEFAULT_ANSWER_TOKENS = 128
DEFAULT_HOP_REPLY_TOKENS = 16
DEFAULT_TEXT_CONTEXTS = 4
GSM8K_PROTOCOL_ITEMS = 150
MAX_HOPS = 64
# llama.cpp rounds n_ctx up to a multiple of this.
N_CTX_STEP = 256

# One row per (context, controller, budget, hop), in this column order.
ROW_FIELDS = (
    "source",
    "context_id",
    "controller",
    "budget",
    "hop",
    "status",
    "error",
    "n_context_tokens",
    "n_card_tokens",
    "card_tokens_match_reference",
    "card_bytes",
    "payload_bytes",
    "bits_per_element",
    "file_bits_per_element",
    "export_ms",
    "prefill_ms",
    "import_ms",
    "measure_ms",
    "n_kl_positions",
    "kl_mean",
    "kl_worst",
    "kl_fresh",
    "kl_floor",
    "top1",
    "gen_cap",
    "gen_compared_tokens",
    "gen_agree_tokens",
    "gen_agree_fraction",
    "n_solution_tokens",
    "loglik",
    "ref_loglik",
    "loglik_delta",
    "gold_answer",
    "answer",
    "ref_answer",
    "correct",
    "ref_correct",
)

SUMMARY_FIELDS = ("controller", "budget", "hop", "n_contexts", "n_skipped", *qm.MEAN_FIELDS, "kl_max")


# -- inputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalItem:
    """One context of the evaluation.

    The sender reads `context`. Receivers teacher-force `follow` after the
    handed-off tokens: the text's continuation, or for GSM8K the answer
    prompt (`follow[:n_prompt]`) and the reference solution. Text receivers
    generate after `follow`; GSM8K receivers generate after the answer prompt.
    """

    item_id: str
    source: str  # "text" or "gsm8k"
    context: list[int]
    follow: list[int]
    n_prompt: int = 0
    gold_answer: str | None = None

    @property
    def is_gsm8k(self) -> bool:
        return self.source == "gsm8k"


class Tokenizer:
    """Tokenizer that loads a model's vocabulary only (no weights, no context)."""

    def __init__(self, model_path: str) -> None:
        import llama_cpp

        self._vocab = llama_cpp.Llama(model_path=model_path, vocab_only=True, verbose=False)

    def __call__(self, text: str, add_bos: bool = False) -> list[int]:
        return self._vocab.tokenize(text.encode("utf-8"), add_bos=add_bos)

    def close(self) -> None:
        self._vocab.close()


def text_items(
    tokenize: Callable[..., list[int]],
    text: str,
    *,
    n_context_tokens: int,
    continuation_tokens: int,
    n_contexts: int,
    seed: int,
    name: str = "text",
    first_context: int = 0,
) -> list[EvalItem]:
    """Cut `text` into contexts of `n_context_tokens` tokens (BOS included), each followed by its continuation.

    When the text contains enough tokens the contexts are consecutive windows
    from its start, beginning with window number `first_context`. A shorter
    text is repeated (joined by a blank line) and the windows start at
    distinct token offsets drawn with `seed`. There `first_context` must be 0,
    because another draw could repeat a window of an earlier part.

    Raises:
        ValueError: for an empty text, sizes below 2 tokens, or a
            `first_context` the text cannot serve with consecutive windows.
    """
    if n_context_tokens < 2 or continuation_tokens < 1 or n_contexts < 1 or first_context < 0:
        raise ValueError(
            f"need at least 2 context tokens, 1 continuation token, 1 context and a first context >= 0, got "
            f"{n_context_tokens}, {continuation_tokens}, {n_contexts} and {first_context}"
        )
    bos = tokenize("", add_bos=True)
    stream = tokenize(text)
    if not stream:
        raise ValueError(f"the text {name!r} is empty (no tokens); pass a file that contains text")
    span = n_context_tokens - len(bos) + continuation_tokens
    if len(stream) >= (first_context + n_contexts) * span:
        offsets = [i * span for i in range(first_context, first_context + n_contexts)]
    elif first_context > 0:
        raise ValueError(
            f"the text {name!r} has {len(stream)} tokens, fewer than the {first_context + n_contexts} consecutive "
            f"windows of {span} tokens that --first-context {first_context} with --n-contexts {n_contexts} needs; "
            "use --first-context 0 or a longer text"
        )
    else:
        if n_contexts > len(stream):
            raise ValueError(
                f"the text {name!r} has {len(stream)} tokens, fewer than the {n_contexts} contexts requested; "
                "lower --n-contexts"
            )
        rng = np.random.default_rng(seed)
        offsets = sorted(int(o) for o in rng.choice(len(stream), size=n_contexts, replace=False))
        repeat = tokenize("\n\n" + text)
        while len(stream) < offsets[-1] + span:
            stream = stream + repeat
    items = []
    for i, offset in enumerate(offsets):
        window = stream[offset : offset + span]
        n_body = n_context_tokens - len(bos)
        items.append(
            EvalItem(
                item_id=f"{name}@{offset}",
                source="text",
                context=bos + window[:n_body],
                follow=window[n_body:],
            )
        )
        logger.debug("context %d: %s, %d + %d tokens", i, items[-1].item_id, n_context_tokens, continuation_tokens)
    return items


def read_gsm8k(path: Path, n_items: int, first: int = 0) -> list[tuple[str, str]]:
    """Return (question, answer) of the `n_items` records of a GSM8K-style JSONL file that follow the first `first`.

    Raises:
        ValueError: for a line that is not a JSON object with string `question` and `answer`.
    """
    items = []
    n_seen = 0
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if len(items) >= n_items:
                break
            if not line.strip():
                continue
            n_seen += 1
            if n_seen <= first:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("question", "answer")):
                raise ValueError(f"{path}:{line_no}: expected an object with string fields 'question' and 'answer'")
            items.append((record["question"], record["answer"]))
    return items


def gsm8k_items(
    tokenize: Callable[..., list[int]], problems: Sequence[tuple[str, str]], first: int = 0
) -> list[EvalItem]:
    """Build items from (question, reference solution) pairs, numbered from `first` (the file index of the first pair).

    The context is 'Question: <question>' (BOS first); the receiver is
    prompted with '\\nAnswer:' and scored on ' <solution>' with its
    calculator annotations removed.
    """
    prompt = tokenize(GSM8K_ANSWER_PROMPT)
    items = []
    for i, (question, answer) in enumerate(problems):
        solution = tokenize(" " + qm.strip_calculator_annotations(answer).strip())
        items.append(
            EvalItem(
                item_id=f"gsm8k-{first + i}",
                source="gsm8k",
                context=tokenize(GSM8K_QUESTION_PREFIX + question.strip(), add_bos=True),
                follow=prompt + solution,
                n_prompt=len(prompt),
                gold_answer=qm.gsm8k_reference_answer(answer),
            )
        )
    return items


# -- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class QualityConfig:
    """Settings of one `eval quality` run; the CLI option of the same name describes each field."""

    model_path: str
    controllers: tuple[str, ...]
    budgets: tuple[float, ...]
    hops: tuple[int, ...]
    continuation_tokens: int = DEFAULT_CONTINUATION_TOKENS
    gen_cap: int = DEFAULT_GEN_CAP
    answer_tokens: int = DEFAULT_ANSWER_TOKENS
    hop_reply_tokens: int = DEFAULT_HOP_REPLY_TOKENS
    n_threads: int = 0
    flash_attn: bool = False
    fresh_control: bool = False
    seed: int = 0
    model_name: str = ""
    source: str = ""
    command: str = ""

    @property
    def max_hop(self) -> int:
        return max(self.hops)

    @property
    def configurations(self) -> list[tuple[str, float]]:
        return [(c, b) for c in self.controllers for b in self.budgets]

    def threads(self) -> int:
        return self.n_threads or os.cpu_count() or 1


def parse_budgets(text: str) -> tuple[float, ...]:
    """Parse '2,3,4' into budgets in bits per element; each must lie in (0, 16]."""
    budgets = []
    for part in _split(text, "budget"):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"budget {part!r} is not a number") from None
        if not 0 < value <= LOSSLESS_BUDGET:
            raise ValueError(f"budget {value:g} is out of range; use bits per element in (0, 16]")
        budgets.append(value)
    return tuple(dict.fromkeys(budgets))


def parse_hops(text: str) -> tuple[int, ...]:
    """Parse '1,2,4' into sorted hop counts, each in 1..MAX_HOPS."""
    hops = []
    for part in _split(text, "hop"):
        if not part.isdigit() or not 1 <= int(part) <= MAX_HOPS:
            raise ValueError(f"hop count {part!r} must be an integer in 1..{MAX_HOPS}")
        hops.append(int(part))
    return tuple(sorted(set(hops)))


# A controller entry NAME uses the product's defaults: per-layer weights from
# the model's sensitivity table when one ships, or else keys weighted by
# DEFAULT_K_WEIGHT. NAME:flat turns both off, so 'uniform:flat' stores every
# K and V row at the same width.
FLAT_SUFFIX = ":flat"


def export_options(entry: str) -> tuple[str, dict[str, Any]]:
    """Return the controller name and the extra export_card arguments of a controller entry."""
    if entry.endswith(FLAT_SUFFIX):
        return entry[: -len(FLAT_SUFFIX)], {"sensitivity": None, "k_weight": 1.0}
    return entry, {}


def parse_controllers(text: str, known: Sequence[str]) -> tuple[str, ...]:
    """Parse 'uniform:flat,key-norm' (or 'all') against the registered controller names."""
    if text.strip() == "all":
        return ("uniform" + FLAT_SUFFIX, *known)
    names = _split(text, "controller")
    unknown = [n for n in names if export_options(n)[0] not in known]
    if unknown:
        raise ValueError(
            f"unknown controller(s) {', '.join(unknown)}; choose from: {', '.join(known)} (or 'all'), "
            f"each optionally with {FLAT_SUFFIX!r}"
        )
    return tuple(dict.fromkeys(names))


def _split(text: str, what: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"no {what} given in {text!r}")
    return parts


def count_steps(config: QualityConfig, n_items: int) -> int:
    """Return the progress steps of a run: per item the sender, then per hop the chain advances and the measurements."""
    per_hop_chain = (config.max_hop - 1) * (1 + len(config.configurations))
    per_hop_eval = len(config.hops) * (1 + len(config.configurations))
    return n_items * (1 + per_hop_chain + per_hop_eval)


def required_n_ctx(config: QualityConfig, items: Sequence[EvalItem], n_instruction: int) -> int:
    """Return the context size that fits the longest chain plus its continuation and generation, rounded up."""
    longest = 0
    for item in items:
        generated = max(config.gen_cap, config.answer_tokens) if item.is_gsm8k else config.gen_cap
        hops = (config.max_hop - 1) * (n_instruction + config.hop_reply_tokens)
        longest = max(longest, len(item.context) + hops + len(item.follow) + generated + 1)
    return -(-longest // N_CTX_STEP) * N_CTX_STEP


# -- running -----------------------------------------------------------------------------


@dataclass
class Measurement:
    """Measurements of one card by a receiver."""

    import_ms: float
    n_card_tokens: int
    top1: np.ndarray  # (n_kl_positions,) arg-max token per position
    generated: list[int]
    log_probs: np.ndarray | None = None  # (n_kl_positions, n_vocab) float64; lossless chain only
    kl: np.ndarray | None = None  # (n_kl_positions,) nats; quantized chains only
    top1_agreement: float | None = None
    loglik: float | None = None
    answer: str | None = None


@dataclass
class _Chain:
    controller: str
    budget: float
    card: CacheCard | None = None
    card_bytes: int = 0
    export_ms: float = 0.0
    error: str = ""


@dataclass
class ItemResult:
    """The cells of one item and how long it took."""

    rows: list[dict[str, Any]]
    prefill_ms: float
    wall_s: float


def _clear(llm: Llama) -> None:
    llm.clear_cache()


class QualityRunner:
    """Runner that owns the sender, worker and evaluator contexts of one model and runs items through them."""

    def __init__(self, config: QualityConfig, n_ctx: int) -> None:
        from .llama import Llama

        self.config = config
        threads = config.threads()
        options: dict[str, Any] = {
            "n_ctx": n_ctx,
            "n_threads": threads,
            "n_threads_batch": threads,
            "flash_attn": config.flash_attn,
            "verbose": False,
        }
        self.sender = Llama(config.model_path, **options)
        self.worker = Llama(config.model_path, **options)
        self.evaluator = Llama(config.model_path, logits_all=True, **options)
        self.instruction = self.sender.tokenize(HOP_INSTRUCTION.encode("utf-8"), add_bos=False)
        # The first decode of a context builds its compute graph; keep that out of the prefill time.
        self.sender.eval(self.instruction)
        _clear(self.sender)
        model = self.sender._model
        self._vocab = model.vocab
        # Banned from hop replies, so no chain appends an end of text mid-conversation.
        self._end_tokens = [t for t in {int(model.token_eos()), int(model.token_eot())} if t >= 0]

    def close(self) -> None:
        for llm in (self.sender, self.worker, self.evaluator):
            llm.close()

    # -- one item --------------------------------------------------------------------

    def run_item(
        self,
        item: EvalItem,
        step: Callable[[str], None] = lambda _: None,
        cards: dict[tuple[str, float, int], np.ndarray] | None = None,
    ) -> ItemResult:
        """Measure every (controller, budget, hop) cell of one item.

        Args:
            item: the context and what follows it.
            step: called once per progress step with a short description.
            cards: when given, receives the token ids of every card made, keyed by
                (controller, budget, hop); the lossless chain's under
                (LOSSLESS_NAME, 16.0, hop).
        """
        config = self.config
        start = time.perf_counter()
        sender = self.sender
        _clear(sender)
        t0 = time.perf_counter()
        sender.eval(item.context)
        prefill_ms = (time.perf_counter() - t0) * 1e3

        ref = _Chain(LOSSLESS_NAME, LOSSLESS_BUDGET)
        self._export(sender, ref, hop=1, parent_sha256="")
        chains = [_Chain(c, b) for c, b in config.configurations]
        for chain in chains:
            self._export(sender, chain, hop=1, parent_sha256="")
        step(f"{item.item_id}: prefill and export")
        self._record(cards, [ref, *chains], hop=1)

        rows: list[dict[str, Any]] = []
        fresh: dict[tuple[str, float], CacheCard | None] = {}
        for hop in range(1, config.max_hop + 1):
            if hop > 1:
                appended = self.instruction + self._reference_reply(ref)
                self._advance(ref, appended, hop)
                step(f"{item.item_id}: hop {hop} lossless chain")
                if config.fresh_control and hop in config.hops:
                    # The worker now contains the lossless chain's hop, so quantize it once per configuration.
                    fresh = {(c.controller, c.budget): self._fresh_card(c, hop) for c in chains}
                for chain in chains:
                    self._advance(chain, appended, hop)
                    step(f"{item.item_id}: hop {hop} {chain.controller} b{chain.budget:g}")
                self._record(cards, [ref, *chains], hop=hop)
            if hop not in config.hops:
                continue
            assert ref.card is not None, ref.error
            reference = self._measure(ref.card, item, None)
            floor = self._measure(qm.nudged_card(ref.card, seed=hop), item, reference, generate=False).kl
            assert floor is not None
            step(f"{item.item_id}: hop {hop} measure lossless")
            for chain in chains:
                row = self._cell(item, chain, hop, ref, reference, prefill_ms)
                row["kl_floor"] = float(floor.mean())
                if config.fresh_control and row["status"] == "ok" and hop == 1:
                    # At hop 1 the chain's card is the card made once.
                    row["kl_fresh"] = row["kl_mean"]
                elif config.fresh_control and row["status"] == "ok":
                    fresh_card = fresh.get((chain.controller, chain.budget))
                    if fresh_card is not None:
                        fresh_kl = self._measure(fresh_card, item, reference, generate=False).kl
                        assert fresh_kl is not None
                        row["kl_fresh"] = float(fresh_kl.mean())
                rows.append(row)
                step(f"{item.item_id}: hop {hop} measure {chain.controller} b{chain.budget:g}")
        wall_s = time.perf_counter() - start
        logger.info("%s: %d cells in %.1f s (prefill %.0f ms)", item.item_id, len(rows), wall_s, prefill_ms)
        return ItemResult(rows, prefill_ms, wall_s)

    @staticmethod
    def _record(cards: dict[tuple[str, float, int], np.ndarray] | None, chains: Sequence[_Chain], hop: int) -> None:
        if cards is None:
            return
        for chain in chains:
            if chain.card is not None:
                cards[(chain.controller, chain.budget, hop)] = chain.card.token_ids.copy()

    def _export(self, llm: Llama, chain: _Chain, hop: int, parent_sha256: str) -> None:
        from .errors import BudgetError

        controller, options = export_options(
            LOSSLESS_CONTROLLER if chain.controller == LOSSLESS_NAME else chain.controller
        )
        try:
            card = llm.export_card(
                **options,
                budget=chain.budget,
                controller=controller,
                hop=hop,
                parent_sha256=parent_sha256,
                n_threads=self.config.threads(),
            )
        except BudgetError as exc:
            chain.card, chain.error = None, str(exc)
            return
        assert llm.last_export_timing is not None
        chain.export_ms = llm.last_export_timing.total_ms
        # Serializing sets the card's SHA-256 (the next hop's parent) and gives its file size.
        chain.card_bytes = len(card.to_bytes())
        chain.card = card

    def _fresh_card(self, chain: _Chain, hop: int) -> CacheCard | None:
        """Export the worker's sequence (the lossless chain at `hop`) once with the chain's controller and budget."""
        probe = _Chain(chain.controller, chain.budget)
        self._export(self.worker, probe, hop=hop, parent_sha256="")
        return probe.card

    def _import(self, llm: Llama, card: CacheCard) -> float:
        _clear(llm)
        llm.import_card(card, n_threads=self.config.threads())
        assert llm.last_import_timing is not None
        return llm.last_import_timing.total_ms

    def _reference_reply(self, ref: _Chain) -> list[int]:
        """Generate the lossless chain's greedy reply after the hop instruction (EOS excluded)."""
        assert ref.card is not None, ref.error
        self._import(self.worker, ref.card)
        self.worker.eval(self.instruction)
        return self._greedy(self.worker, self.worker.last_logits(), self.config.hop_reply_tokens, ban_eos=True)

    def _advance(self, chain: _Chain, appended: list[int], hop: int) -> None:
        """Import the chain's card, append the hop's tokens in one batch, export the next card."""
        if chain.card is None:
            return
        parent = chain.card
        self._import(self.worker, parent)
        self.worker.eval(appended)
        self._export(self.worker, chain, hop=hop, parent_sha256=parent.sha256)

    def _greedy(
        self,
        llm: Llama,
        logits: np.ndarray,
        max_tokens: int,
        *,
        ban_eos: bool = False,
        reference: Sequence[int] | None = None,
        stop_text: Callable[[str], bool] | None = None,
    ) -> list[int]:
        """Decode greedily from `logits` (those of the last token in `llm`).

        Stops after `max_tokens`, at EOS (unless banned), at the first token
        that differs from `reference`, or when `stop_text` accepts the text so
        far. The last generated token is not decoded into `llm`.
        """
        import llama_cpp

        out: list[int] = []
        while len(out) < max_tokens:
            if ban_eos:
                logits = logits.copy()
                logits[self._end_tokens] = -np.inf
            token = int(np.argmax(logits))
            out.append(token)
            if len(out) >= max_tokens or llama_cpp.llama_vocab_is_eog(self._vocab, token):
                break
            if reference is not None and (len(out) > len(reference) or reference[len(out) - 1] != token):
                break
            if stop_text is not None and stop_text(self._text(llm, out)):
                break
            llm.eval([token])
            logits = llm.last_logits()
        return out

    @staticmethod
    def _text(llm: Llama, tokens: list[int]) -> str:
        return llm.detokenize(tokens).decode("utf-8", errors="replace")

    def _measure(
        self, card: CacheCard, item: EvalItem, reference: Measurement | None, generate: bool = True
    ) -> Measurement:
        """Import `card` into the evaluator and measure it; against `reference` when given.

        With `generate` False only the teacher-forced metrics are computed.
        """
        config = self.config
        llm = self.evaluator
        import_ms = self._import(llm, card)
        n_card = llm.n_tokens
        llm.eval(item.follow)
        # Row i contains the distribution after follow[i], so row n_prompt - 1 + j predicts solution token j.
        logits = llm.scores[n_card : n_card + len(item.follow)]
        kl_logits = logits[: min(config.continuation_tokens, len(item.follow))]
        top1 = kl_logits.argmax(axis=-1)
        result = Measurement(import_ms=import_ms, n_card_tokens=n_card, top1=top1, generated=[])

        if reference is None:
            result.log_probs = qm.reference_log_probs(kl_logits)
        else:
            assert reference.log_probs is not None
            result.kl = qm.kl_per_position(reference.log_probs, kl_logits)
            result.top1_agreement = qm.top1_agreement(reference.top1, kl_logits)

        if not generate:
            return result
        if item.is_gsm8k:
            result.loglik = qm.sequence_log_likelihood(logits[item.n_prompt - 1 : -1], item.follow[item.n_prompt :])
            # The solution was teacher-forced; generation starts again from the answer prompt.
            self._import(llm, card)
            llm.eval(item.follow[: item.n_prompt])
            n_new = max(config.gen_cap, config.answer_tokens)
            result.generated = self._greedy(llm, llm.last_logits(), n_new, stop_text=_gsm8k_done)
            result.answer = qm.last_number(_gsm8k_solution_text(self._text(llm, result.generated)))
        else:
            # Generation continues after the teacher-forced continuation; a
            # quantized receiver stops at its first difference from the reference.
            first = np.array(logits[-1], copy=True)
            result.generated = self._greedy(
                llm,
                first,
                config.gen_cap,
                reference=reference.generated if reference is not None else None,
            )
        return result

    def _cell(
        self,
        item: EvalItem,
        chain: _Chain,
        hop: int,
        ref: _Chain,
        reference: Measurement,
        prefill_ms: float,
    ) -> dict[str, Any]:
        config = self.config
        row: dict[str, Any] = dict.fromkeys(ROW_FIELDS)
        row.update(
            source=item.source,
            context_id=item.item_id,
            controller=chain.controller,
            budget=chain.budget,
            hop=hop,
            n_context_tokens=len(item.context),
            prefill_ms=round(prefill_ms, 2),
            gen_cap=config.gen_cap,
            gold_answer=item.gold_answer,
            ref_loglik=reference.loglik,
            ref_answer=reference.answer,
            ref_correct=_correct(reference.answer, item.gold_answer),
        )
        if item.is_gsm8k:
            row["n_solution_tokens"] = len(item.follow) - item.n_prompt
        if chain.card is None:
            row.update(status="budget_error", error=chain.error)
            return row

        assert ref.card is not None
        card = chain.card
        start = time.perf_counter()
        got = self._measure(card, item, reference)
        measure_ms = (time.perf_counter() - start) * 1e3
        assert got.kl is not None
        compared = reference.generated[: config.gen_cap]
        agree = qm.leading_agreement(compared, got.generated[: config.gen_cap])

        row.update(
            status="ok",
            error="",
            n_card_tokens=card.n_tokens,
            card_tokens_match_reference=bool(np.array_equal(card.token_ids, ref.card.token_ids)),
            card_bytes=chain.card_bytes,
            payload_bytes=card.payload_bytes,
            bits_per_element=card.bits_per_element,
            file_bits_per_element=8.0 * chain.card_bytes / max(1, card.n_elements),
            export_ms=round(chain.export_ms, 2),
            import_ms=round(got.import_ms, 2),
            measure_ms=round(measure_ms, 2),
            n_kl_positions=int(got.kl.shape[0]),
            kl_mean=float(got.kl.mean()),
            kl_worst=float(got.kl.max()),
            top1=got.top1_agreement,
            gen_compared_tokens=len(compared),
            gen_agree_tokens=agree,
            gen_agree_fraction=agree / len(compared) if compared else math.nan,
        )
        if item.is_gsm8k:
            assert got.loglik is not None and reference.loglik is not None
            row.update(
                loglik=got.loglik,
                loglik_delta=got.loglik - reference.loglik,
                answer=got.answer,
                correct=_correct(got.answer, item.gold_answer),
            )
        return row


def _gsm8k_solution_text(text: str) -> str:
    """Cut a generated solution at its first stop string."""
    for stop in GSM8K_STOP_STRINGS:
        text = text.split(stop, 1)[0]
    return text


def _gsm8k_done(text: str) -> bool:
    if any(stop in text for stop in GSM8K_STOP_STRINGS):
        return True
    # A completed final-answer line: '#### 18' followed by a line break.
    mark = text.rfind(qm.GSM8K_ANSWER_MARK)
    return mark >= 0 and "\n" in text[mark:] and qm.last_number(text[mark:]) is not None


def _correct(answer: str | None, gold: str | None) -> bool | None:
    if gold is None:
        return None
    return answer is not None and answer == gold


def environment(threads: int) -> dict[str, Any]:
    """Describe the machine and software of a run."""
    import llama_cpp

    from . import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "machine": f"{cpu}, {os.cpu_count()} cores",
        "os": platform.platform(),
        "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__,
        "qkvshare_edge": __version__,
        "threads": threads,
        "load_average_start": load,
    }


def run_quality(
    config: QualityConfig,
    items: Sequence[EvalItem],
    step: Callable[[str], None] = lambda _: None,
    n_ctx: int | None = None,
) -> dict[str, Any]:
    """Run every item through a fresh `QualityRunner`; return the result document (see `write_outputs`)."""
    start = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    env = environment(config.threads())
    if n_ctx is None:
        tokenizer = Tokenizer(config.model_path)
        try:
            n_ctx = required_n_ctx(config, items, len(tokenizer(HOP_INSTRUCTION)))
        finally:
            tokenizer.close()
    runner = QualityRunner(config, n_ctx)
    rows: list[dict[str, Any]] = []
    item_info = []
    try:
        for item in items:
            result = runner.run_item(item, step)
            rows.extend(result.rows)
            item_info.append(
                {
                    "context_id": item.item_id,
                    "source": item.source,
                    "n_context_tokens": len(item.context),
                    "n_follow_tokens": len(item.follow),
                    "prefill_ms": round(result.prefill_ms, 2),
                    "wall_s": round(result.wall_s, 2),
                }
            )
    finally:
        n_ctx_used = runner.sender.n_ctx()
        runner.close()
    try:
        env["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        env["load_average_end"] = None
    return {
        "command": config.command,
        "config": {**asdict(config), "n_ctx": n_ctx_used, "hop_instruction": HOP_INSTRUCTION},
        "environment": env,
        "started": started,
        "wall_s": round(time.perf_counter() - start, 2),
        "items": item_info,
        "cells": rows,
        "summary": qm.summarize(rows),
    }


# Settings that may differ between parts of one run: where the model file lies, the
# thread count, the command line and the context size that the longest item needed.
# NOTE: the thread count is assumed not to change the numbers, because ggml's CPU kernels
# split rows between threads, not single dot products. Runs with other counts were not compared.
_PART_SETTINGS = ("model_path", "n_threads", "command", "n_ctx")


def merge_results(parts: Sequence[dict[str, Any]], command: str) -> dict[str, Any]:
    """Join the result documents of runs over different contexts into one, as if one run had measured them all.

    The parts must agree on every setting but those in `_PART_SETTINGS`
    (typically runs that differ only in --first-context and --n-contexts).
    The summary is computed again from the joined cells; `wall_s` is the
    parts' total, and `parts` lists their commands.

    Raises:
        ValueError: for no parts, parts with other settings, or a context measured by two parts.
    """
    if not parts:
        raise ValueError("no runs to merge. Pass the output folders of two or more `eval quality` runs")
    first = {k: v for k, v in parts[0]["config"].items() if k not in _PART_SETTINGS}
    for number, part in enumerate(parts[1:], start=2):
        other = {k: v for k, v in part["config"].items() if k not in _PART_SETTINGS}
        differing = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if differing:
            details = ", ".join(f"{k} {first.get(k)!r} against {other.get(k)!r}" for k in differing)
            raise ValueError(
                f"run {number} has other settings than run 1 ({details}). Only runs that differ in their "
                "contexts (--first-context, --n-contexts) can be merged"
            )
    owner: dict[str, int] = {}
    for number, part in enumerate(parts, start=1):
        for item in part["items"]:
            context_id = item["context_id"]
            if context_id in owner:
                raise ValueError(
                    f"context {context_id} is in run {owner[context_id]} and run {number}. Give each run "
                    "its own contexts with --first-context"
                )
            owner[context_id] = number
    cells = [cell for part in parts for cell in part["cells"]]
    return {
        "command": command,
        "parts": [part["command"] for part in parts],
        "config": {**parts[0]["config"], "n_ctx": max(part["config"]["n_ctx"] for part in parts)},
        "environment": parts[0]["environment"],
        "started": min(part["started"] for part in parts),
        "wall_s": round(sum(part["wall_s"] for part in parts), 2),
        "items": [item for part in parts for item in part["items"]],
        "cells": cells,
        "summary": qm.summarize(cells),
    }


def read_result(path: Path) -> dict[str, Any]:
    """Read the quality.json of an `eval quality` output folder (or that file itself).

    Raises:
        ValueError: when the file is missing or is not a result document.
    """
    file = path / "quality.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{file} not found. Pass the --out folder of an `eval quality` run")
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not a valid JSON result document ({exc})") from None
    keys = ("command", "config", "environment", "started", "wall_s", "items", "cells")
    missing = [key for key in keys if key not in document] if isinstance(document, dict) else list(keys)
    if missing:
        raise ValueError(f"{file} is not the quality.json of an `eval quality` run (missing: {', '.join(missing)})")
    return document


# -- outputs ------------------------------------------------------------------------------


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def write_csv(path: Path, rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> Path:
    """Write rows as CSV with the given columns (missing values empty)."""
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for row in rows:
            writer.writerow([_csv_value(row.get(name)) for name in fields])
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def markdown_table(result: dict[str, Any]) -> str:
    """Return the summary as a Markdown table: one line per (controller, budget, hop)."""
    gsm8k = result["config"]["source"].startswith("gsm8k")
    header = [
        "controller",
        "budget",
        "hop",
        "bits/elem (file)",
        "card KiB",
        "export ms",
        "mean KL",
        "worst ctx KL",
        "top-1",
        "greedy agree",
    ]
    fresh = any(s.get("kl_fresh") is not None for s in result["summary"])
    if fresh:
        header.insert(header.index("top-1"), "fresh KL")
    floor = any(s.get("kl_floor") is not None for s in result["summary"])
    if floor:
        header.insert(header.index("top-1"), "floor KL")
    if gsm8k:
        header += ["Δ loglik", "accuracy", "lossless acc."]
    header.append("n")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    controllers = list(dict.fromkeys(s["controller"] for s in result["summary"]))
    # Controllers side by side at each budget, so rows of equal card bytes are adjacent.
    ordered = sorted(result["summary"], key=lambda s: (s["hop"], s["budget"], controllers.index(s["controller"])))
    for s in ordered:
        if s["n_contexts"] == 0:
            continue  # listed below the table with the reason
        kib = s["card_bytes"] / 1024 if s["card_bytes"] is not None else None
        cells = [
            s["controller"],
            f"{s['budget']:g}",
            str(s["hop"]),
            f"{_fmt(s['bits_per_element'], '.2f')} ({_fmt(s['file_bits_per_element'], '.2f')})",
            _fmt(kib, ",.0f"),
            _fmt(s["export_ms"], ".0f"),
            _fmt(s["kl_mean"], ".4f"),
            _fmt(s["kl_max"], ".4f"),
            *([_fmt(s.get("kl_fresh"), ".4f")] if fresh else []),
            *([_fmt(s.get("kl_floor"), ".4f")] if floor else []),
            _fmt(s["top1"], ".3f"),
            _fmt(s["gen_agree_fraction"], ".2f"),
        ]
        if gsm8k:
            cells += [_fmt(s["loglik_delta"], "+.2f"), _fmt(s["correct"], ".3f"), _fmt(s["ref_correct"], ".3f")]
        cells.append(str(s["n_contexts"]) + (f" ({s['n_skipped']} skipped)" if s["n_skipped"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(result: dict[str, Any]) -> str:
    """Return a Markdown report: command, machine, time, and the summary table."""
    config, env = result["config"], result["environment"]
    lines = ["# Card quality against lossless handoff", "", f"Command: `{result['command']}`", ""]
    if result.get("parts"):
        lines += [f"Joined from {len(result['parts'])} runs:", ""]
        lines += [f"- `{part}`" for part in result["parts"]]
        lines.append("")
    took = "the runs took" if result.get("parts") else "took"
    lines += [
        f"Model {config['model_name']}, source {config['source']}, {len(result['items'])} contexts, "
        f"continuation {config['continuation_tokens']} tokens, greedy cap {config['gen_cap']} tokens, "
        f"flash attention {'on' if config['flash_attn'] else 'off'}, n_ctx {config['n_ctx']}. "
        f"Sender prefill: {_fmt(qm.mean_or_none([i['prefill_ms'] for i in result['items']]), ',.0f')} ms per context "
        f"on average.",
        "",
        f"Machine: {env['machine']}, threads: {env['threads']}, llama-cpp-python {env['llama_cpp_python']}, "
        f"load average {env['load_average_start']} at the start. Started {result['started']}, "
        f"{took} {result['wall_s']:.0f} s.",
        "",
        "Bits per element count codes, scales and width tags (in brackets: the whole card file). "
        "Greedy agree is the share of the reference's greedy tokens matched before the first difference. "
        "Floor KL is the KL of the lossless card with every element moved one f16 step: "
        "the backend's rounding noise, below which no card can be judged.",
        "",
        markdown_table(result),
    ]
    skipped = sorted({(c["controller"], c["budget"], c["error"]) for c in result["cells"] if c["status"] != "ok"})
    for controller, budget, error in skipped:
        lines.append(f"- skipped {controller} at budget {budget:g}: {error}")
    return "\n".join(lines) + "\n"


# Metrics plotted, with axis labels; the GSM8K-only ones last.
_PLOT_METRICS = (
    ("kl_mean", "mean KL (nats/token)"),
    ("top1", "top-1 agreement"),
    ("gen_agree_fraction", "greedy agreement"),
)
_PLOT_METRICS_GSM8K = (
    ("loglik_delta", "Δ log-lik. of solution (nats)"),
    ("correct", "final-number accuracy"),
)


def write_plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write `quality_vs_budget.png` and `quality_vs_hop.png`; return their paths (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError:
        logger.warning("matplotlib is not installed; no plots written")
        return []
    summary = [s for s in result["summary"] if s["n_contexts"] > 0]
    if not summary:
        return []
    metrics = list(_PLOT_METRICS)
    if result["config"]["source"].startswith("gsm8k"):
        metrics += _PLOT_METRICS_GSM8K
    controllers = list(dict.fromkeys(s["controller"] for s in summary))
    hops = sorted({s["hop"] for s in summary})
    budgets = sorted({s["budget"] for s in summary})
    title = f"{result['config']['model_name']}, {result['config']['source']}, {len(result['items'])} contexts"

    def lookup(controller: str, budget: float, hop: int, metric: str) -> float | None:
        for s in summary:
            if s["controller"] == controller and s["budget"] == budget and s["hop"] == hop:
                return s[metric]
        return None

    def draw(path: Path, columns: list[Any], column_label: str, xs: list[Any], x_label: str, by_budget: bool) -> Path:
        fig, axes = plt.subplots(
            len(metrics), len(columns), figsize=(3.2 * len(columns) + 1, 2.4 * len(metrics)), squeeze=False
        )
        for col, fixed in enumerate(columns):
            for row, (metric, label) in enumerate(metrics):
                ax = axes[row][col]
                for controller in controllers:
                    points = []
                    for x in xs:
                        budget, hop = (x, fixed) if by_budget else (fixed, x)
                        value = lookup(controller, budget, hop, metric)
                        if value is not None and not (metric == "kl_mean" and value <= 0):
                            points.append((x, value))
                    if points:
                        ax.plot(*zip(*points, strict=True), marker="o", label=controller)
                if metric == "kl_mean" and ax.has_data():
                    ax.set_yscale("log")
                if row == 0:
                    ax.set_title(f"{column_label} {fixed:g}")
                if row == len(metrics) - 1:
                    ax.set_xlabel(x_label)
                if col == 0:
                    ax.set_ylabel(label)
                # Budgets and hop counts are spread like powers of two.
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [f"{x:g}" for x in xs])
                ax.xaxis.set_minor_locator(NullLocator())
                ax.grid(True, alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="upper right", fontsize="small")
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0, 0.88, 0.96))
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    return [
        draw(out_dir / "quality_vs_budget.png", hops, "hop", budgets, "budget (bits per element)", True),
        draw(out_dir / "quality_vs_hop.png", budgets, "budget", hops, "hop", False),
    ]


def write_outputs(result: dict[str, Any], out_dir: Path, plots: bool = True) -> list[Path]:
    """Write quality.json, quality_cells.csv, quality_summary.csv, quality.md and the plots into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "quality.json"
    json_path.write_text(json.dumps(_json_safe(result), indent=1) + "\n", encoding="utf-8")
    written = [
        json_path,
        write_csv(out_dir / "quality_cells.csv", result["cells"], ROW_FIELDS),
        write_csv(out_dir / "quality_summary.csv", result["summary"], SUMMARY_FIELDS),
    ]
    report = out_dir / "quality.md"
    report.write_text(markdown_report(result), encoding="utf-8")
    written.append(report)
    if plots:
        written += write_plots(result, out_dir)
    return written


# -- command line -----------------------------------------------------------------------


@contextmanager
def _progress(total: int, quiet: bool) -> Iterator[Callable[[str], None]]:
    """Yield a step callback that advances a progress bar on stderr."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("{task.description:<40}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=quiet,
    )
    with progress:
        task = progress.add_task("loading the model", total=total)

        def step(message: str) -> None:
            progress.update(task, advance=1, description=message[:40])

        yield step


def _command_line(options: list[tuple[str, object]]) -> str:
    parts = ["qkvedge", "eval", "quality"]
    for flag, value in options:
        if isinstance(value, bool):
            if value:
                parts.append(flag)
        elif value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def register(app: typer.Typer) -> None:
    """Add the `eval` command group to the CLI."""
    eval_app = typer.Typer(help="Evaluate card quality against lossless handoff.", no_args_is_help=True)
    app.add_typer(eval_app, name="eval")

    # Imported here: cli.py imports this module while it is being set up.
    from .cli import _fail, _setup_logging

    @eval_app.command("quality")
    def quality(
        model: Annotated[
            str, typer.Option("--model", "-m", help="Registry name (see `qkvedge models`) or path to a .gguf file.")
        ] = DEFAULT_MODEL,
        text: Annotated[
            Path | None,
            typer.Option(help="Plain-text file cut into contexts (default without --gsm8k: the demo text, repeated)."),
        ] = None,
        gsm8k: Annotated[
            Path | None, typer.Option(help="GSM8K-style JSONL file (fields 'question', 'answer'); items in file order.")
        ] = None,
        context_tokens: Annotated[
            int, typer.Option(min=2, help="Tokens per text context, BOS included.")
        ] = DEFAULT_CONTEXT_TOKENS,
        n_contexts: Annotated[
            int | None,
            typer.Option(
                min=1,
                help=f"Contexts (default: {GSM8K_PROTOCOL_ITEMS} GSM8K items, {DEFAULT_TEXT_CONTEXTS} text windows).",
            ),
        ] = None,
        first_context: Annotated[
            int,
            typer.Option(
                min=0,
                help="Skip this many GSM8K items or text windows: runs that differ only here can be split "
                "across processes and joined with `qkvedge eval merge`.",
            ),
        ] = 0,
        budgets: Annotated[str, typer.Option(help="Budgets in bits per element, comma-separated.")] = DEFAULT_BUDGETS,
        controllers: Annotated[
            str,
            typer.Option(
                help="Controllers, comma-separated: NAME, or NAME:flat without per-layer and K/V weights; "
                "'all' for uniform:flat and every registered one."
            ),
        ] = "all",
        hops: Annotated[str, typer.Option(help="Hop counts to report, comma-separated.")] = DEFAULT_HOPS,
        continuation_tokens: Annotated[
            int, typer.Option(min=1, help="Teacher-forced positions scored for KL and top-1.")
        ] = DEFAULT_CONTINUATION_TOKENS,
        gen_cap: Annotated[
            int, typer.Option(min=1, help="Greedy tokens compared for generation agreement.")
        ] = DEFAULT_GEN_CAP,
        answer_tokens: Annotated[
            int, typer.Option(min=0, help="Maximum tokens of a generated GSM8K solution.")
        ] = DEFAULT_ANSWER_TOKENS,
        hop_reply_tokens: Annotated[
            int, typer.Option(min=1, help="Greedy reply tokens each hop appends after its instruction.")
        ] = DEFAULT_HOP_REPLY_TOKENS,
        seed: Annotated[int, typer.Option(help="Seed of the context offsets in a text shorter than the run.")] = 0,
        flash_attn: Annotated[bool, typer.Option(help="Flash attention in every context.")] = False,
        fresh_control: Annotated[
            bool,
            typer.Option(
                help="Also measure, at each reported hop, a card made once from the lossless chain's context "
                "(kl_fresh), to tell compounding over hops from the change of context."
            ),
        ] = False,
        threads: Annotated[int, typer.Option("--threads", "-t", min=0, help="CPU threads; 0 for every core.")] = 0,
        out: Annotated[
            Path, typer.Option("--out", "-o", help="Folder for the JSON, CSV, Markdown and PNG files.")
        ] = Path("quality-results"),
        plots: Annotated[bool, typer.Option(help="Write PNG plots (needs matplotlib).")] = True,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each context and handoff.")] = False,
    ) -> None:
        """KL, top-1 and greedy agreement (and GSM8K accuracy) of cards, per controller, budget and hop."""
        from .controllers import CONTROLLERS
        from .models import resolve_model

        _setup_logging(verbose)
        if text is not None and gsm8k is not None:
            _fail("pass --text or --gsm8k, not both")
        try:
            budget_list = parse_budgets(budgets)
            hop_list = parse_hops(hops)
            controller_list = parse_controllers(controllers, list(CONTROLLERS))
            model_path = str(resolve_model(model))
        except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
            _fail(str(exc))
        for path in (text, gsm8k):
            if path is not None and not path.is_file():
                _fail(f"{path} is not a file")

        tokenizer = Tokenizer(model_path)
        try:
            if gsm8k is not None:
                n_items = n_contexts or GSM8K_PROTOCOL_ITEMS
                problems = read_gsm8k(gsm8k, n_items, first_context)
                if len(problems) < n_items:
                    typer.secho(
                        f"note: {gsm8k} holds {len(problems)} items after the first {first_context}, "
                        f"fewer than {n_items}",
                        err=True,
                    )
                items = gsm8k_items(tokenizer, problems, first_context)
                source = f"gsm8k:{gsm8k.name}"
            else:
                from .demo import demo_context

                body = text.read_text(encoding="utf-8") if text is not None else demo_context()
                name = text.name if text is not None else "demo_context.txt"
                items = text_items(
                    tokenizer,
                    body,
                    n_context_tokens=context_tokens,
                    continuation_tokens=continuation_tokens,
                    n_contexts=n_contexts or DEFAULT_TEXT_CONTEXTS,
                    seed=seed,
                    name=name,
                    first_context=first_context,
                )
                source = f"text:{name}:{context_tokens}"
            n_instruction = len(tokenizer(HOP_INSTRUCTION))
        except (ValueError, OSError) as exc:
            _fail(str(exc))
        finally:
            tokenizer.close()
        if not items:
            _fail("no contexts to measure")

        command = _command_line(
            [
                ("--model", model),
                ("--text", str(text) if text is not None else None),
                ("--gsm8k", str(gsm8k) if gsm8k is not None else None),
                ("--context-tokens", context_tokens if gsm8k is None else None),
                ("--n-contexts", n_contexts),
                ("--first-context", first_context or None),
                ("--budgets", budgets),
                ("--controllers", controllers),
                ("--hops", hops),
                ("--continuation-tokens", continuation_tokens),
                ("--gen-cap", gen_cap),
                ("--answer-tokens", answer_tokens if gsm8k is not None else None),
                ("--hop-reply-tokens", hop_reply_tokens),
                ("--seed", seed),
                ("--flash-attn", flash_attn),
                ("--fresh-control", fresh_control),
                ("--threads", threads),
                ("--out", str(out)),
            ]
        )
        config = QualityConfig(
            model_path=model_path,
            controllers=controller_list,
            budgets=budget_list,
            hops=hop_list,
            continuation_tokens=continuation_tokens,
            gen_cap=gen_cap,
            answer_tokens=answer_tokens if gsm8k is not None else 0,
            hop_reply_tokens=hop_reply_tokens,
            n_threads=threads,
            flash_attn=flash_attn,
            fresh_control=fresh_control,
            seed=seed,
            model_name=Path(model).name if model.endswith(".gguf") else model,
            source=source,
            command=command,
        )
        n_ctx = required_n_ctx(config, items, n_instruction)
        try:
            with _progress(count_steps(config, len(items)), quiet) as step:
                result = run_quality(config, items, step, n_ctx=n_ctx)
        except (ValueError, RuntimeError) as exc:
            _fail(str(exc))
        written = write_outputs(result, out, plots=plots)
        typer.echo(markdown_table(result), nl=False)
        skipped = [c for c in result["cells"] if c["status"] != "ok"]
        if skipped:
            reasons = sorted({f"{c['controller']} b{c['budget']:g}: {c['error']}" for c in skipped})
            typer.echo(f"skipped {len(skipped)} cells: " + "; ".join(reasons))
        mismatched = [c for c in result["cells"] if c["card_tokens_match_reference"] is False]
        if mismatched:
            typer.secho(f"warning: {len(mismatched)} cells hold other tokens than the lossless chain", err=True)
        typer.echo(f"took {result['wall_s']:.0f} s; wrote " + ", ".join(str(p) for p in written))

    @eval_app.command("merge")
    def merge(
        runs: Annotated[
            list[Path],
            typer.Argument(
                metavar="RUN...",
                help="Output folders (or their quality.json) of `eval quality` runs that differ only in "
                "--first-context and --n-contexts.",
            ),
        ],
        out: Annotated[
            Path, typer.Option("--out", "-o", help="Folder for the joined JSON, CSV, Markdown and PNG files.")
        ] = Path("quality-results"),
        plots: Annotated[bool, typer.Option(help="Write PNG plots (needs matplotlib).")] = True,
    ) -> None:
        """Join `eval quality` runs over different contexts into one table, as if one run had measured them all."""
        target = out.resolve()
        for run in runs:
            folder = run if run.is_dir() else run.parent
            if folder.resolve() == target:
                _fail(f"--out {out} is the folder of run {run}; write the joined table to a new folder")
        try:
            parts = [read_result(run) for run in runs]
            command = shlex.join(["qkvedge", "eval", "merge", *map(str, runs), "--out", str(out)])
            result = merge_results(parts, command)
        except ValueError as exc:
            _fail(str(exc))
        written = write_outputs(result, out, plots=plots)
        typer.echo(markdown_table(result), nl=False)
        typer.echo(f"joined {len(parts)} runs, {len(result['items'])} contexts; wrote " + ", ".join(map(str, written)))
