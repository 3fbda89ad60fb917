"""`qkvedge bench`: receiver time-to-first-token and codec throughput benchmarks.

`bench ttft` compares the receiver's time to first token by handoff path
(re-prefill, llama.cpp's state file, CacheCards at several budgets);
`bench codec` measures the native codec against memcpy. Both write JSON,
Markdown and PNG plots into `--out`; the logic is in `bench_ttft.py` and
`bench_codec.py`.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from .codec import DEFAULT_GROUP_SIZE
from .models import DEFAULT_MODEL

ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="Registry name (see `qkvedge models`) or path to a .gguf file.")
]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Folder for the JSON, Markdown and PNG files.")]
ThreadsOption = Annotated[int, typer.Option("--threads", "-t", min=0, help="CPU threads, 0 for every core.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


@contextmanager
def _progress(total: int, quiet: bool) -> Iterator[Callable[[str], None]]:
    """Yield a step callback that advances a progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description:<44}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=quiet,
    )
    with progress:
        task = progress.add_task("starting", total=total)

        def step(message: str) -> None:
            progress.update(task, advance=1, description=message)

        yield step


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")


def _report_targets(targets: list[dict[str, Any]], where: str) -> None:
    missed = [t for t in targets if not t["met"]]
    if not targets:
        return
    if not missed:
        typer.echo(f"targets: all {len(targets)} met")
        return
    typer.echo(f"targets: {len(missed)} of {len(targets)} MISSED (see {where}):")
    for t in missed:
        scope = f"{t['context']} tokens, {t['path']}" if "context" in t else t["workload"]
        typer.echo(f"  MISSED {t['target']}: {scope}: {t['value']:.2f} (limit {t['limit']:g})")


def _command_line(name: str, options: list[tuple[str, object]]) -> str:
    parts = ["qkvedge", "bench", name]
    for flag, value in options:
        if isinstance(value, bool):
            if value:
                parts.append(flag)
        elif value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def register(app: typer.Typer) -> None:
    """Add the `bench` command group to the CLI."""
    bench_app = typer.Typer(help="Benchmarks: receiver TTFT and codec throughput.", no_args_is_help=True)
    app.add_typer(bench_app, name="bench")

    # Imported here because cli.py imports this module while cli.py itself is being set up.
    from .cli import _fail, _setup_logging

    @bench_app.command("ttft")
    def ttft(
        model: ModelOption = DEFAULT_MODEL,
        contexts: Annotated[
            str, typer.Option(help="Context lengths in tokens, comma-separated; K means 1024 (e.g. 1K,2K,8K).")
        ] = "1K,2K,4K,8K,16K,32K",
        repeats: Annotated[int, typer.Option(min=1, help="Runs of each state/card path and export.")] = 5,
        reprefill_repeats: Annotated[
            int, typer.Option(min=1, help="Re-prefill runs below 8K tokens (the sender's prefill is the first).")
        ] = 3,
        reprefill_repeats_long: Annotated[int, typer.Option(min=1, help="Re-prefill runs at 8K tokens and more.")] = 1,
        follow_up: Annotated[int, typer.Option(min=1, help="Tokens of the receiver's follow-up prompt.")] = 20,
        link_mbps: Annotated[
            str, typer.Option(help="Link speeds in Mbit/s for the handoff table, comma-separated.")
        ] = "1,10,100,1000",
        flash_attn: Annotated[bool, typer.Option(help="Flash attention in both contexts.")] = False,
        memory: Annotated[
            bool, typer.Option(help="Measure peak extra memory of export and import in child processes.")
        ] = True,
        threads: ThreadsOption = 0,
        out: OutOption = Path("bench-results"),
        work_dir: Annotated[
            Path | None, typer.Option(help="Keep the state files and cards here (default: a temporary folder).")
        ] = None,
        plots: Annotated[bool, typer.Option(help="Write PNG plots (needs matplotlib).")] = True,
        quiet: QuietOption = False,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each handoff.")] = False,
    ) -> None:
        """Receiver time to first token: re-prefill vs llama.cpp state file vs CacheCards, by context length."""
        from . import bench_ttft
        from .models import resolve_model

        _setup_logging(verbose)
        try:
            model_path = str(resolve_model(model))
            context_list = bench_ttft.parse_contexts(contexts)
            mbps = bench_ttft.parse_floats(link_mbps, "link speed")
        except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
            _fail(str(exc))
        command = _command_line(
            "ttft",
            [
                ("--model", model),
                ("--contexts", contexts),
                ("--repeats", repeats),
                ("--reprefill-repeats", reprefill_repeats),
                ("--reprefill-repeats-long", reprefill_repeats_long),
                ("--follow-up", follow_up),
                ("--link-mbps", link_mbps),
                ("--flash-attn", flash_attn),
                ("--no-memory", not memory),
                ("--threads", threads),
                ("--out", str(out)),
            ],
        )
        config = bench_ttft.TtftConfig(
            model_path=model_path,
            model_name=model if not model.endswith(".gguf") else Path(model).name,
            contexts=context_list,
            repeats=repeats,
            reprefill_repeats=reprefill_repeats,
            reprefill_repeats_long=reprefill_repeats_long,
            follow_up_tokens=follow_up,
            n_threads=threads,
            flash_attn=flash_attn,
            link_mbps=mbps,
            memory=memory,
            work_dir=work_dir,
            command=command,
        )
        out.mkdir(parents=True, exist_ok=True)

        def save(partial_result: dict[str, Any]) -> None:
            _write_json(out / "ttft.json", partial_result)
            (out / "ttft.md").write_text(bench_ttft.markdown_report(partial_result), encoding="utf-8")

        with _progress(bench_ttft.count_steps(config), quiet) as step:
            result = bench_ttft.run_ttft(config, step, on_context=save)
        if not result["contexts"]:
            _fail("no context could be measured: " + "; ".join(s["reason"] for s in result["skipped_contexts"]))
        save(result)
        written = [out / "ttft.json", out / "ttft.md"]
        if plots:
            written += bench_ttft.write_plots(result, out)
        for ctx in result["contexts"]:
            p = ctx["paths"]
            typer.echo(
                f"{ctx['n_tokens']:>6} tokens: re-prefill {p['reprefill']['ttft_ms_median']:,.0f} ms, "
                f"state {p['state']['ttft_ms_median']:,.1f} ms, "
                f"card-default {p['card-default']['ttft_ms_median']:,.1f} ms "
                f"({p['card-default']['ratio_to_state']:.2f}x state, "
                f"{p['card-default']['speedup_vs_reprefill']:,.0f}x faster than re-prefill)"
            )
        for skipped in result["skipped_contexts"]:
            typer.echo(f"{skipped['n_tokens']:>6} tokens: skipped ({skipped['reason']})")
        _report_targets(result["targets"], str(out / "ttft.md"))
        typer.echo("wrote " + ", ".join(str(p) for p in written))

    @bench_app.command("codec")
    def codec_bench(
        mib: Annotated[float, typer.Option(min=0.001, help="f16 size of the benchmark rows in MiB.")] = 32.0,
        row_size: Annotated[int, typer.Option(min=8, help="Elements per row (K/V width of one layer).")] = 256,
        group_size: Annotated[
            int, typer.Option(min=8, help="Elements per scale group (default: the codec's default).")
        ] = DEFAULT_GROUP_SIZE,
        repeats: Annotated[int, typer.Option(min=1, help="Timed runs of each measurement.")] = 7,
        threads: ThreadsOption = 0,
        out: OutOption = Path("bench-results"),
        save_arrays: Annotated[
            Path | None,
            typer.Option(help="Also save the rows, widths, payloads and decoded outputs to this .npz file."),
        ] = None,
        plots: Annotated[bool, typer.Option(help="Write a PNG plot (needs matplotlib).")] = True,
        quiet: QuietOption = False,
    ) -> None:
        """Native codec encode/decode throughput (GB/s of f16 K/V) per width, against memcpy."""
        import numpy as np

        from . import bench_codec

        _setup_logging(False)
        if row_size % group_size != 0 or group_size % 8 != 0:
            _fail(f"row size {row_size} must be a multiple of the group size {group_size}, itself a multiple of 8")
        command = _command_line(
            "codec",
            [
                ("--mib", f"{mib:g}"),
                ("--row-size", row_size),
                ("--group-size", group_size),
                ("--repeats", repeats),
                ("--threads", threads),
                ("--out", str(out)),
            ],
        )
        config = bench_codec.CodecConfig(
            mib=mib, row_size=row_size, group_size=group_size, repeats=repeats, threads=threads, command=command
        )
        out.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] | None = {} if save_arrays is not None else None
        n_steps = len(bench_codec.make_widths(config)) * len({1, config.all_threads()}) + 1
        with _progress(n_steps, quiet) as step:
            result = bench_codec.run_codec(config, step, keep_arrays=arrays)
        _write_json(out / "codec.json", result)
        (out / "codec.md").write_text(bench_codec.markdown_report(result), encoding="utf-8")
        written = [out / "codec.json", out / "codec.md"]
        if plots:
            png = bench_codec.write_plot(result, out / "codec.png")
            if png is not None:
                written.append(png)
        if save_arrays is not None and arrays is not None:
            np.savez(save_arrays, **arrays)
            written.append(save_arrays)
        for name, w in result["workloads"].items():
            for t, r in w["threads"].items():
                typer.echo(
                    f"{name:>5} bits, {t} thread(s): encode {r['encode_gbps']:.2f} GB/s, "
                    f"decode {r['decode_gbps']:.2f} GB/s, memcpy {r['memcpy_gbps']:.2f} GB/s"
                )
        failed = [name for name, ok in result["checks"].items() if not ok]
        for name in failed:
            typer.echo(f"check FAILED: {name}")
        _report_targets(result["targets"], str(out / "codec.md"))
        typer.echo("wrote " + ", ".join(str(p) for p in written))
        if failed:
            raise typer.Exit(code=1)
