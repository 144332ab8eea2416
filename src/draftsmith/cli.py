"""Command line: each command parses flags and calls the library."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from draftsmith.cli_options import (Adaptive, Backend, Compile, CudaGraphs, Device, DraftTokens, Drafter, Dtype,
                                   Fused, LossySparseVerify, NgramMax, Prune, Routers, Target, TrustRemoteCode,
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
    from draftsmith.drafters import build_drafter
    from draftsmith.engine import GenerationConfig, SpecEngine
    from draftsmith.models import load_model
    from draftsmith.predictor import build_pruner
    from draftsmith.routers import load_routers_for
    from draftsmith.sparse import RoutedVerify

    config = GenerationConfig(max_new_tokens=max_new_tokens, k=k, stop=stop or [], adaptive=adaptive,
                              sampling=SamplingConfig(temperature, top_k, top_p, seed))
    if not prompt:
        raise DraftsmithError("the prompt is empty: give at least one character of text")
    with console.status(f"loading {target}"):
        loaded = load_model(target, device=device, dtype=dtype, trust_remote_code=trust_remote_code, backend=backend)
        draft = build_drafter(drafter, loaded, max_n=ngram_max)
        pruner = build_pruner(prune, loaded)
        sparse = RoutedVerify(load_routers_for(routers, loaded)) if lossy_sparse_verify else None
    if chat:
        prompt = loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
    with console.status("compiling the target's forward (once per process)") if compile else nullcontext():
        engine = SpecEngine(loaded.model, draft, loaded.tokenizer, compile=compile, weights=weights, pruner=pruner,
                            sparse_verify=sparse, graphs=cuda_graphs, fused=fused)
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
    """The README's main job: `bench` with quick defaults (HF generate greedy and prompt lookup, our plain and
    adaptive n-gram decoding, in fp32 and in bf16 where it is fast, interleaved on 10 HumanEval prompts, pass@1 in
    a sandbox); about 10 minutes on 2 CPU cores."""
    from draftsmith.demo import run_demo

    run_demo(console, target=target, prompts=prompts, max_new_tokens=max_new_tokens, k=k, device=device, dtype=dtype)


def main() -> None:
    try:
        app(standalone_mode=False)
    except DraftsmithError as e:
        console.print(f"[bold red]error:[/] {e}")
        sys.exit(2)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:  # click usage errors carry their own exit code and message
        # click's, or the copy of click that typer vendors: usage errors show their message, not a traceback
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        raise


from draftsmith.serve.cli import register as _register_serve  # noqa: E402

_register_serve(app)

from draftsmith.export_cli import register as _register_export  # noqa: E402

_register_export(app)

from draftsmith.doctor_cli import register as _register_doctor  # noqa: E402

_register_doctor(app)

from draftsmith.bench.cli import register as _register_bench  # noqa: E402
from draftsmith.train.cli import register as _register_distill  # noqa: E402
from draftsmith.bigram_cli import register as _register_bigram  # noqa: E402

from draftsmith.train.heads_cli import train_app  # noqa: E402
import draftsmith.train.router_cli  # noqa: E402,F401  (adds `train router` to train_app)

_register_bench(app)
_register_distill(app)
_register_bigram(app)
app.add_typer(train_app, name="train")

from draftsmith.collab.cli import register as _register_collab  # noqa: E402

_register_collab(app)


if __name__ == "__main__":
    main()
