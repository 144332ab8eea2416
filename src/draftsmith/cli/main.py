"""Command line: each command parses flags and calls the library."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from draftsmith.cli.options import (Adaptive, Backend, Compile, CudaGraphs, Device, DraftTokens, Drafter, Dtype,
                                   Fused, LossySparseVerify, NgramBranches, NgramMax, Prune, Routers, Target, TrustRemoteCode,
                                   Weights)
from draftsmith.errors import DraftsmithError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Lossless speculative decoding for code LLMs.")
console = Console(stderr=True)



def stats_table(name: str, s: dict, title: str) -> Table:
    table = Table(title=title)
    # short headers: the table must fit an 80-column terminal without clipping them
    columns = ("drafter", "new tokens", "target steps", "tok/s", "tau", "accept", "draft s", "verify s")
    for column in columns:
        table.add_column(column, justify="right" if column != "drafter" else "left")
    table.add_row(name, str(s["new_tokens"]), str(s["target_steps"]), f"{s['tokens_per_s']:.1f}", f"{s['tau']:.2f}",
                  f"{s['acceptance_rate']:.0%}", f"{s['draft_s']:.2f}", f"{s['verify_s']:.2f}")
    return table


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    target: Target = "smollm2",
    drafter: Drafter = "auto",
    k: DraftTokens = 16,
    adaptive: Adaptive = True,
    max_new_tokens: int = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy; > 0 samples (lossless).")] = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable).")] = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the tokenizer's chat template.")] = False,
    device: Device = "cpu",
    dtype: Dtype = "auto",
    ngram_max: NgramMax = 4,
    ngram_branches: NgramBranches = 1,
    compile: Compile = False,
    cuda_graphs: CudaGraphs = None,
    fused: Fused = None,
    weights: Weights = "auto",
    backend: Backend = "torch",
    prune: Prune = "none",
    lossy_sparse_verify: LossySparseVerify = False,
    routers: Routers = "",
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Generate a continuation, streaming it, then print the speculative statistics."""
    from draftsmith.acceptance import SamplingConfig
    from draftsmith.builder import build_engine
    from draftsmith.backends.protocol import BackendConfig
    from draftsmith.engine import GenerationConfig
    from draftsmith.models import load_model

    config = GenerationConfig(max_new_tokens=max_new_tokens, k=k, stop=stop or [], adaptive=adaptive,
                              sampling=SamplingConfig(temperature, top_k, top_p, seed))
    if not prompt:
        raise DraftsmithError("the prompt is empty: give at least one character of text")
    with console.status(f"loading {target}"):
        loaded = load_model(target, device=device, dtype=dtype, trust_remote_code=trust_remote_code, backend=backend)
    if chat:
        prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
    with console.status("compiling the target's forward (once per process)" if compile else f"preparing {drafter}"):
        engine = build_engine(loaded, drafter, BackendConfig(compile=compile, weights=weights, graphs=cuda_graphs,
                                                       fused=fused),
                              prune=prune, lossy_sparse_verify=lossy_sparse_verify, routers=routers,
                              max_n=ngram_max, branches=ngram_branches)
    if compile:
        compile_s = engine.runner.compile_s
        console.print(f"compiled in {compile_s:.1f} s" if compile_s is not None else "compiling failed: eager")
    sys.stdout.write(prompt)
    result = engine.generate_text(prompt, config, on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()),
                                  templated=chat)
    sys.stdout.write("\n")
    console.print(stats_table(drafter, result.stats.as_dict(), f"finish: {result.finish_reason}"))


@app.command()
def demo(
    target: Target = "smollm2",
    prompts: Annotated[int, typer.Option(help="HumanEval prompts to run (after a warm-up).")] = 10,
    max_new_tokens: int = 128,
    k: Annotated[int, typer.Option(help="Most draft tokens per step for the adaptive n-gram drafter.")] = 16,
    device: Device = "cpu",
    dtype: Annotated[str, typer.Option(help="The run's dtype; with float32 on hardware with fast bf16, every "
                                            "method also runs in bf16.")] = "float32",
) -> None:
    """`make demo`'s job: `bench` with quick defaults (HF generate greedy and prompt lookup, our plain and
    adaptive n-gram decoding, in fp32 and in bf16 where it is fast, interleaved on 10 HumanEval prompts, pass@1 in
    a sandbox); about 10 minutes on 2 CPU cores."""
    from draftsmith.demo import run_demo

    run_demo(console, target=target, prompts=prompts, max_new_tokens=max_new_tokens, k=k, device=device, dtype=dtype)


INTERRUPTED = 130  # the shell's status for a process ended by SIGINT (128 + 2)


def main() -> None:
    """Run the CLI; whatever goes wrong ends in one line on stderr and a non-zero status, never a traceback
    (DRAFTSMITH_TRACEBACK=1 shows the traceback of an unexpected error, for a bug report)."""
    try:
        # typer turns Ctrl-C into Exit(130), which non-standalone mode returns instead of raising
        status = app(standalone_mode=False)
    except DraftsmithError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:  # raised outside typer's own handling (while a command's module imports)
        status = INTERRUPTED
    except typer.Abort as e:
        why = "end of input" if isinstance(e.__cause__, EOFError) else "aborted"
        console.print(f"[bold red]error:[/] {why}", highlight=False)
        sys.exit(1)
    except Exception as e:
        # click's, or the copy of click that typer vendors: usage errors show their message, not a traceback
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        if os.environ.get("DRAFTSMITH_TRACEBACK"):
            raise
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        console.print(f"[bold red]error:[/] {type(e).__name__}{': ' + detail if detail else ''} "
                      "(unexpected: DRAFTSMITH_TRACEBACK=1 shows where)", highlight=False, soft_wrap=True)
        sys.exit(1)
    if status == INTERRUPTED:
        console.print("interrupted", highlight=False)
    sys.exit(status if isinstance(status, int) else 0)


from draftsmith.cli import train_heads, train_routers  # noqa: E402,F401  (add `train heads|router|predictor`)
from draftsmith.cli.bench import register as _register_bench  # noqa: E402
from draftsmith.cli.collab import register as _register_collab  # noqa: E402
from draftsmith.cli.doctor import register as _register_doctor  # noqa: E402
from draftsmith.cli.export import register as _register_export  # noqa: E402
from draftsmith.cli.serve import register as _register_serve  # noqa: E402
from draftsmith.cli.train import train_app  # noqa: E402
from draftsmith.cli.train_bigram import build_bigram_command  # noqa: E402
from draftsmith.cli.train_student import distill_command  # noqa: E402

_register_serve(app)
_register_export(app)
_register_doctor(app)
_register_bench(app)
train_app.command("student")(distill_command)
train_app.command("bigram")(build_bigram_command)
app.add_typer(train_app, name="train")
# the spellings of the last release, kept working (hidden) for one more
app.command("distill", hidden=True)(distill_command)
app.command("build-bigram", hidden=True)(build_bigram_command)
_register_collab(app)


if __name__ == "__main__":
    main()
