"""The `serve` command. The main CLI adds it with `register(app)`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def serve_command(
    target: Annotated[str, typer.Option(help="HF hub id, local folder, .gguf file, or embedded alias 'smollm2'.")]
    = "smollm2",
    drafter: Annotated[str, typer.Option(help="none | ngram | model:PATH (draft LM with the target's tokenizer).")]
    = "ngram",
    k: Annotated[int, typer.Option(help="Draft tokens per target step (0 = plain decoding).")] = 8,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 8000,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32 (bit-exact greedy), bfloat16, float16 or auto.")] = "float32",
    queue_size: Annotated[int, typer.Option(help="Requests that may wait for the engine; more get 429.")] = 64,
    model_name: Annotated[Optional[str], typer.Option(help="Name clients use in 'model' (default: --target).")]
    = None,
    ngram_max: Annotated[int, typer.Option(help="Longest n-gram the ngram drafter looks up.")] = 4,
    trust_remote_code: bool = False,
) -> None:
    """Serve the OpenAI completions and chat API with speculative decoding (one request at a time)."""
    import uvicorn

    from draftsmith.models import load_model
    from draftsmith.serve.app import create_app

    loaded = load_model(target, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    app = create_app(loaded, drafter, k=k, model_name=model_name or target, queue_size=queue_size, max_n=ngram_max)
    uvicorn.run(app, host=host, port=port, log_level="info")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
