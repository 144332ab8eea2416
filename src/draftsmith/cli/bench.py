"""The `bench` command. The main CLI adds it with `register(app)`; `demo` runs it through `run_and_show`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from draftsmith.bench.config import DEFAULT_METHODS, BenchConfig, split_methods
from draftsmith.bench.workloads import WORKLOADS
from draftsmith.bench.report import markdown_table
from draftsmith.cli.options import Device, Dtype, Target

if TYPE_CHECKING:
    from draftsmith.bench.runner import BenchResult

def run_and_show(config: BenchConfig, console: Console | None = None) -> BenchResult:
    """Run the benchmark with progress on stderr, then print the summary table and the files on stdout."""
    from draftsmith.bench.runner import run_bench  # torch and transformers load only when a command runs

    result = run_bench(config, console or Console(stderr=True))
    show_result(result)
    return result


def show_result(result: BenchResult) -> None:
    """Print a report's heading, summary table, notes and files on stdout."""
    meta = result.metadata
    # the Markdown table as report.md holds it: plain text, never cut to the terminal's width
    out = Console(soft_wrap=True, highlight=False)
    out.print(f"\n{meta['workload']}, {result.summaries[0].prompts} prompts after a warm-up, {meta['model']} on "
              f"{meta['device']} ({meta['dtype']}), at most {meta['max_new_tokens']} new tokens\n", markup=False)
    out.print(markdown_table(result.summaries), markup=False)
    out.print(result.notes, style="dim", markup=False)
    if "collab_markdown" in result.paths:  # the collab workload: per domain
        out.print("\n" + result.paths["collab_markdown"].read_text(), markup=False)
    for name, path in result.paths.items():
        out.print(f"{name:>12}: {path}", markup=False)


def bench_command(
    target: Target = "smollm2",
    workload: Annotated[str, typer.Option(
        help=f"{' | '.join(WORKLOADS)}: HumanEval's bare prompts, or (instruct, for chat models) a request to "
             "complete the function through the chat template, the reply's code block tested; line/block "
             "completion on code.")] = "humaneval",
    methods: Annotated[str, typer.Option(
        help="Comma list: hf-greedy, hf-prompt-lookup:N, hf-assisted:PATH, plain, ngram[:k=8,adaptive=1], "
             "model:PATH[:k=4], eagle, medusa; llama.cpp peers llamacpp[:FILE], llamacpp-lookup:N, "
             "llama-server[:TYPE][:n=N,m=M] (pip install 'draftsmith\\[llamacpp]'); llamacpp=1 runs one of ours on "
             "the llama.cpp backend; add @bf16 (or @fp32) to run a method in that dtype."
    )] = ",".join(DEFAULT_METHODS),
    limit: Annotated[int, typer.Option(help="Prompts to run; the first also serves as an untimed warm-up.")] = 20,
    max_new_tokens: int = 128,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos/--stop-on-eos", help="Run every generation to "
                                             "--max-new-tokens, past end-of-sequence tokens: the same lengths "
                                             "for every method and library.")] = False,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    out: Annotated[Optional[str], typer.Option(help="Output folder (default: bench-results/<timestamp>).")] = None,
    seed: int = 0,
    pass_at_1: Annotated[bool, typer.Option("--pass-at-1/--no-pass-at-1",
                                            help="Run HumanEval tests (sandboxed) for pass@1.")] = True,
    allow_unsandboxed: Annotated[bool, typer.Option(
        help="Run HumanEval tests even where no isolation (bwrap, unshare+setpriv) works: only resource "
             "limits and an audit hook then stand between model-written code and this machine.")] = False,
    llama_server: Annotated[Optional[str], typer.Option(
        help="A llama-server binary (built from llama.cpp) for the llama-server methods.")] = None,
) -> None:
    """Benchmark methods on one model, interleaved per prompt: speed, tau, exactness, pass@1 or EM/ES."""
    run_and_show(BenchConfig(
        target=target, workload=workload, methods=split_methods(methods), limit=limit,
        max_new_tokens=max_new_tokens, ignore_eos=ignore_eos, device=device, dtype=dtype, seed=seed, pass_at_1=pass_at_1, out=out,
        allow_unsandboxed=allow_unsandboxed, llama_server=llama_server,
    ))


def bench_report_command(
    folder: Annotated[Path, typer.Argument(help="A folder `draftsmith bench --out` wrote.")],
    baseline: Annotated[str, typer.Option(help="The method speedups (and their 95% intervals) are measured "
                                                "against, e.g. an identical twin of the run's reference.")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: FOLDER/vs-BASELINE).")] = None,
) -> None:
    """Recompute a benchmark's report from its report.json against another baseline method: no decoding."""
    from draftsmith.bench.runner import rereport

    show_result(rereport(folder, baseline, out))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
    app.command("bench-report")(bench_report_command)
