"""Agent commands of the CLI: chat, serve, pipeline, and card export/import."""

# No `from __future__ import annotations`: typer reads the parameter annotations at run time, and those of the
# commands name option types that `register` imports from cli.py, which module globals cannot see.
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import QKVShareError

logger = logging.getLogger(__name__)

AgentsOption = Annotated[
    Path | None,
    typer.Option(
        "--agents",
        help="Agents file (TOML). Default: agents.toml in the working directory, else the built-in agent1 and agent2.",
    ),
]
AgentOption = Annotated[
    str | None, typer.Option("--agent", "-a", help="Agent name; default: the file's default agent.")
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Log loading, handoffs and requests.")]

# Errors that a command reports as one line and exit status 1.
_EXPECTED_ERRORS = (QKVShareError, ValueError, FileNotFoundError, ModuleNotFoundError, OSError)


def register(app: typer.Typer, card_app: typer.Typer) -> None:
    """Add the agent commands to the CLI and the card export/import commands to `card_app`."""
    # Imported here: cli.py imports this module at its end, after defining these.
    from .cli import ModelOption, ThreadsOption, _check_budget, _check_controller, _fail, _setup_logging
    from .controllers import DEFAULT_CONTROLLER
    from .handoff import DEFAULT_BUDGET_BITS
    from .models import DEFAULT_MODEL
    from .server import DEFAULT_HOST, DEFAULT_MAX_SESSIONS, DEFAULT_PORT, DEFAULT_SESSION_TTL_S

    BudgetOption = Annotated[
        float, typer.Option(callback=_check_budget, help="Card budget in bits per K/V element (16 = lossless f16).")
    ]
    ControllerOption = Annotated[
        str, typer.Option(callback=_check_controller, help="Importance controller for the bit allocation.")
    ]

    def load_pool(agents_path: Path | None, threads: int | None) -> Any:
        from .agents import load_agents
        from .chat import AgentPool

        try:
            return AgentPool(load_agents(agents_path), threads=threads)
        except _EXPECTED_ERRORS as exc:
            _fail(str(exc))

    @app.command()
    def chat(
        agents: AgentsOption = None,
        agent: AgentOption = None,
        handoff_to: Annotated[
            str | None,
            typer.Option(help="Default handoff target: an agent name or the URL of a `qkvedge serve`."),
        ] = None,
        handoff_after: Annotated[
            int | None, typer.Option(min=1, help="Hand off by itself after this many turns (interactive chat).")
        ] = None,
        prompt_file: Annotated[
            Path | None, typer.Option(help="Text file prefilled into the first agent's context before the chat.")
        ] = None,
        ask: Annotated[
            str | None,
            typer.Option(help="Run without a prompt: prefill --prompt-file, hand off once, print the answer to ASK."),
        ] = None,
        as_json: Annotated[
            bool, typer.Option("--json", help="With --ask: print one JSON object with the answer and the timings.")
        ] = False,
        threads: ThreadsOption = None,
        verbose: VerboseOption = False,
    ) -> None:
        """Chat with an agent and hand the conversation to another agent as a CacheCard (/handoff)."""
        from .chat import ChatRepl, run_single

        _setup_logging(verbose)
        pool = load_pool(agents, threads)
        try:
            if ask is not None:
                reply, result, answered_by = run_single(
                    pool,
                    agent,
                    ask=ask,
                    prompt_file=prompt_file,
                    handoff_to=handoff_to,
                    out=sys.stdout,
                    err=sys.stderr,
                    stream=not as_json,
                )
                if as_json:
                    payload: dict[str, Any] = {
                        "agent": answered_by,
                        "answer": reply.text,
                        "reply_tokens": reply.n_tokens,
                        "finish_reason": reply.finish_reason,
                        "ttft_ms": round(reply.ttft_ms, 2),
                        "handoff": None,
                    }
                    if result is not None:
                        payload["handoff"] = {
                            "from": result.source,
                            "to": result.target,
                            "n_tokens": result.n_tokens,
                            "card_bytes": result.card_bytes,
                            "budget": result.budget,
                            "controller": result.controller,
                            "hop": result.hop,
                            "export_ms": round(result.export_ms, 2),
                            "import_ms": round(result.import_ms, 2),
                            "ttft_ms": round(result.ttft_ms or 0.0, 2),
                        }
                    typer.echo(json.dumps(payload))
                return

            _enable_line_editing()
            repl = ChatRepl(
                pool, agent, handoff_to=handoff_to, handoff_after=handoff_after, out=sys.stdout, err=sys.stderr
            )
            if prompt_file is not None:
                repl.command_load(str(prompt_file))
            repl.run()
        except _EXPECTED_ERRORS as exc:
            _fail(str(exc))
        finally:
            pool.close()

    @app.command()
    def serve(
        agents: AgentsOption = None,
        agent: AgentOption = None,
        host: Annotated[
            str, typer.Option(help="Address to listen on. Anything but loopback exposes the agent without auth.")
        ] = DEFAULT_HOST,
        port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port; 0 picks a free one.")] = DEFAULT_PORT,
        max_sessions: Annotated[
            int, typer.Option(min=1, max=256, help="Sessions held at once, each with the agent's n_ctx.")
        ] = DEFAULT_MAX_SESSIONS,
        max_card_mb: Annotated[float, typer.Option(min=0.001, help="Largest card accepted, in MiB.")] = 256.0,
        session_ttl: Annotated[
            float, typer.Option(min=0, help="Seconds after which an idle session may be removed; 0 keeps them.")
        ] = DEFAULT_SESSION_TTL_S,
        key_file: Annotated[
            Path | None,
            typer.Option(help="Shared HMAC key file for card signatures; default: $QKVEDGE_CARD_KEY if set."),
        ] = None,
        require_signed: Annotated[
            bool, typer.Option(help="Reject cards that are not signed with the shared key (HTTP 403).")
        ] = False,
        threads: ThreadsOption = None,
        verbose: VerboseOption = False,
    ) -> None:
        """Run an agent as an HTTP server that imports cards and continues them (OpenAI-compatible chat API)."""
        from .agents import load_agents
        from .server import AgentService, start_server, stop_server
        from .signing import load_key

        _setup_logging(verbose)
        # Starts, stops and caught errors are logged at INFO and WARNING; the server's own logger shows them.
        logging.getLogger("qkvshare_edge.server").setLevel(logging.INFO)
        logger.setLevel(logging.INFO)
        try:
            config = load_agents(agents).get(agent)
            service = AgentService(
                config,
                max_sessions=max_sessions,
                threads=threads,
                max_card_bytes=int(max_card_mb * (1 << 20)),
                session_ttl_s=session_ttl,
                card_key=load_key(key_file),
                require_signed=require_signed,
            )
            server = start_server(service, host, port)
        except _EXPECTED_ERRORS as exc:
            _fail(str(exc))
        if host not in ("127.0.0.1", "::1", "localhost"):
            logger.warning("listening on %s: anyone who can reach this address can use the agent", host)
        typer.echo(
            f"qkvedge serve: agent {config.name} ({Path(config.model).name}, {max_sessions} sessions of n_ctx "
            f"{config.n_ctx}) on {server.url}"
        )
        sys.stdout.flush()

        stopping = {"signal": ""}

        def request_stop(signum: int, _frame: Any) -> None:
            stopping["signal"] = signal.Signals(signum).name

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        try:
            while not stopping["signal"]:
                time.sleep(0.2)
        finally:
            logger.info("stopping on %s", stopping["signal"] or "exit")
            stop_server(server)

    @app.command()
    def pipeline(
        file: Annotated[Path, typer.Argument(help="Pipeline file (TOML) with the task and the chain of agents.")],
        agents: AgentsOption = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per hop.")] = False,
        threads: ThreadsOption = None,
        verbose: VerboseOption = False,
    ) -> None:
        """Run a task through a chain of agents, each handing its context to the next as a card."""
        from .chat import ProgressBar
        from .pipeline import HopResult, load_pipeline, run_pipeline

        _setup_logging(verbose)
        try:
            spec = load_pipeline(file)
        except _EXPECTED_ERRORS as exc:
            _fail(str(exc))
        pool = load_pool(agents, threads)

        def show(result: HopResult) -> None:
            if as_json:
                typer.echo(json.dumps(result.to_dict()))
                return
            typer.echo(result.summary())
            for line in result.reply.strip().splitlines() or [""]:
                typer.echo(f"  | {line}")

        try:
            run_pipeline(spec, pool, on_hop=show, progress=ProgressBar(sys.stderr, "prefill"))
        except _EXPECTED_ERRORS as exc:
            _fail(str(exc))
        finally:
            pool.close()

    @card_app.command("export")
    def card_export(
        out: Annotated[Path, typer.Option("--out", "-o", help="Card file to write (.qkvc).")],
        model: ModelOption = DEFAULT_MODEL,
        prompt_file: Annotated[Path | None, typer.Option(help="Text file to prefill (raw text, BOS added).")] = None,
        prompt: Annotated[str | None, typer.Option(help="Text to prefill, in place of --prompt-file.")] = None,
        budget: BudgetOption = DEFAULT_BUDGET_BITS,
        controller: ControllerOption = DEFAULT_CONTROLLER,
        n_ctx: Annotated[
            int | None, typer.Option(min=16, help="Context size; default: the prompt's tokens plus 16.")
        ] = None,
        flash_attn: Annotated[bool, typer.Option(help="Use flash attention in the prefill context.")] = False,
        threads: ThreadsOption = None,
        verbose: VerboseOption = False,
    ) -> None:
        """Prefill a text and write its KV cache as a card, for scripts (`card import` continues it)."""
        from .chat import ProgressBar

        _setup_logging(verbose)
        if (prompt_file is None) == (prompt is None):
            _fail("pass exactly one of --prompt-file and --prompt")
        try:
            text = prompt if prompt is not None else prompt_file.read_text(encoding="utf-8")  # type: ignore[union-attr]
            result = _export_text(text, model, out, budget, controller, n_ctx, flash_attn, threads, ProgressBar)
        except (*_EXPECTED_ERRORS, UnicodeDecodeError) as exc:
            _fail(str(exc))
        typer.echo(result)

    @card_app.command("import")
    def card_import(
        card: Annotated[Path, typer.Argument(help="Card file to import.")],
        ask: Annotated[str, typer.Option(help="Text appended after the card's context; its continuation is printed.")],
        model: ModelOption = DEFAULT_MODEL,
        max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 64,
        temperature: Annotated[float, typer.Option(min=0, help="Sampling temperature; 0 is greedy.")] = 0.0,
        n_ctx: Annotated[
            int | None, typer.Option(min=16, help="Context size; default: the card's tokens plus room for the reply.")
        ] = None,
        threads: ThreadsOption = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the answer and timings.")] = (
            False
        ),
        verbose: VerboseOption = False,
    ) -> None:
        """Import a card into a fresh context and print the continuation of ASK, without re-prefill."""
        _setup_logging(verbose)
        try:
            _import_and_continue(card, ask, model, max_tokens, temperature, n_ctx, threads, as_json)
        except _EXPECTED_ERRORS as exc:
            _fail(str(exc))


def _enable_line_editing() -> None:
    """Give input() line editing and history on a terminal, where the readline module exists."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - importing it is what enables line editing
        except ImportError:
            logger.debug("the readline module is not available; input has no line editing")


def _export_text(
    text: str,
    model: str,
    out: Path,
    budget: float,
    controller: str,
    n_ctx: int | None,
    flash_attn: bool,
    threads: int | None,
    progress_bar: Any,
) -> str:
    import llama_cpp
    from llama_cpp._internals import LlamaModel

    from .chat import PREFILL_CHUNK
    from .llama import Llama
    from .models import resolve_model

    model_path = str(resolve_model(model))
    # The vocabulary alone gives the prompt's length, and so the context size, before a context exists.
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    vocab = LlamaModel(path_model=model_path, params=params, verbose=False)
    try:
        tokens = vocab.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    finally:
        vocab.close()
    if len(tokens) < 2:
        raise ValueError("the prompt is empty; pass some text to prefill")
    context = n_ctx or len(tokens) + 16
    if len(tokens) > context:
        raise ValueError(f"the prompt has {len(tokens)} tokens, more than --n-ctx {context}; raise --n-ctx")
    llm = Llama(
        model_path, n_ctx=context, n_threads=threads, n_threads_batch=threads, flash_attn=flash_attn, verbose=False
    )
    try:
        bar = progress_bar(sys.stderr, "prefill")
        start = time.perf_counter()
        for offset in range(0, len(tokens), PREFILL_CHUNK):
            llm.eval(tokens[offset : offset + PREFILL_CHUNK])
            if len(tokens) > PREFILL_CHUNK:
                bar(min(offset + PREFILL_CHUNK, len(tokens)), len(tokens))
        bar.close()
        prefill_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        card = llm.export_card(budget=budget, controller=controller)
        path = card.save(out)
        export_ms = (time.perf_counter() - start) * 1e3
    finally:
        llm.close()
    return (
        f"wrote {path}: {card.n_tokens:,} tokens, {path.stat().st_size:,} bytes ({card.bits_per_element:.2f} bits "
        f"per element, budget {budget:g}, {controller}), prefill {prefill_ms:.0f} ms, export {export_ms:.0f} ms"
    )


def _import_and_continue(
    card_path: Path,
    ask: str,
    model: str,
    max_tokens: int,
    temperature: float,
    n_ctx: int | None,
    threads: int | None,
    as_json: bool,
) -> None:
    from .card import CacheCard
    from .llama import Llama
    from .models import resolve_model

    start = time.perf_counter()
    card = CacheCard.load(card_path)
    # A token is at least one byte of text, so this leaves room for ASK's tokens and the reply.
    context = n_ctx or card.n_tokens + len(ask.encode("utf-8")) + max_tokens + 8
    llm = Llama(str(resolve_model(model)), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        llm.import_card(card)
        import_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        ttft_ms = 0.0
        pieces: list[str] = []
        stream = llm.continue_completion(ask, max_tokens=max_tokens, temperature=temperature, stream=True)
        for chunk in stream:
            text = chunk["choices"][0]["text"]
            if text and not pieces:
                ttft_ms = (time.perf_counter() - start) * 1e3
            pieces.append(text)
            if not as_json:
                sys.stdout.write(text)
                sys.stdout.flush()
    finally:
        llm.close()
    if as_json:
        payload = {
            "answer": "".join(pieces),
            "n_tokens": card.n_tokens,
            "hop": card.provenance.hop,
            "import_ms": round(import_ms, 2),
            "ttft_ms": round(ttft_ms, 2),
        }
        typer.echo(json.dumps(payload))
    else:
        typer.echo("")
