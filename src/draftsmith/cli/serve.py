"""The `serve` command. The main CLI adds it with `register(app)`."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Optional

import typer

from draftsmith.cli.options import (Adaptive, Backend, Compile, CudaGraphs, Device, DraftTokens, Drafter, Dtype,
                                   Fused, NgramBranches, NgramMax, Prune, Target, TrustRemoteCode, Weights)
from draftsmith.serve.limits import ServerLimits

DEFAULT_LIMITS = ServerLimits()
API_KEY_ENV = "DRAFTSMITH_API_KEY"


def serve_command(
    target: Target = "smollm2",
    drafter: Drafter = "auto",
    prune: Prune = "none",
    k: DraftTokens = 16,
    adaptive: Adaptive = True,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.", min=0, max=65535)] = 8000,
    device: Device = "cpu",
    dtype: Dtype = "auto",
    queue_size: Annotated[int, typer.Option(help="Requests that may wait for the engine; more get 429.")] = 64,
    model_name: Annotated[Optional[str], typer.Option(help="Name clients use in 'model' (default: --target).")]
    = None,
    ngram_max: NgramMax = 4,
    ngram_branches: NgramBranches = 1,
    compile: Compile = False,
    cuda_graphs: CudaGraphs = None,
    fused: Fused = None,
    weights: Weights = "auto",
    backend: Backend = "torch",
    trust_remote_code: TrustRemoteCode = False,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body; larger ones get 413 unread.")]
    = DEFAULT_LIMITS.max_body_bytes,
    max_prompt_chars: Annotated[int, typer.Option(help="Longest prompt in characters (checked before tokenizing).")]
    = DEFAULT_LIMITS.max_prompt_chars,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt in tokens.")]
    = DEFAULT_LIMITS.max_prompt_tokens,
    max_stop_strings: Annotated[int, typer.Option(help="Most stop strings one request may give.")]
    = DEFAULT_LIMITS.max_stop_strings,
    max_stop_chars: Annotated[int, typer.Option(help="Longest stop string in characters.")]
    = DEFAULT_LIMITS.max_stop_chars,
    default_max_tokens: Annotated[int, typer.Option(
        help="Chat requests without max_tokens generate at most this many (and never past the context).")]
    = DEFAULT_LIMITS.default_max_tokens,
    body_timeout: Annotated[float, typer.Option(help="Seconds a request's body may take to arrive; then 408.")]
    = DEFAULT_LIMITS.body_timeout_s,
    api_key: Annotated[Optional[str], typer.Option(
        envvar=API_KEY_ENV, show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every request but /health (OpenAI clients send their "
             "api_key so).")] = None,
) -> None:
    """Serve the OpenAI completions and chat API with speculative decoding (one request at a time)."""
    import uvicorn

    from draftsmith.backends.protocol import BackendConfig
    from draftsmith.models import load_model
    from draftsmith.serve.app import create_app

    limits = ServerLimits(max_body_bytes=max_body_bytes, max_prompt_chars=max_prompt_chars,
                          max_prompt_tokens=max_prompt_tokens, max_stop_strings=max_stop_strings,
                          max_stop_chars=max_stop_chars, default_max_tokens=default_max_tokens,
                          body_timeout_s=body_timeout)
    warning = exposure_warning(host, api_key)
    if warning:
        typer.echo(f"warning: {warning}", err=True)
    loaded = load_model(target, device=device, dtype=dtype, trust_remote_code=trust_remote_code, backend=backend)
    app = create_app(loaded, drafter, k=k, model_name=model_name or target, queue_size=queue_size,
                     adaptive=adaptive, limits=limits, prune=prune, max_n=ngram_max, branches=ngram_branches,
                     backend=BackendConfig(compile=compile, weights=weights, graphs=cuda_graphs, fused=fused),
                     api_key=api_key or None)
    compile_s = app.state.server.engine.runner.compile_s
    if compile_s is not None:
        typer.echo(f"compiled the target's forward in {compile_s:.1f} s", err=True)
    uvicorn.run(app, host=host, port=port, log_level="info")


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to tell someone who serves beyond this machine with no API key (None when loopback or keyed)."""
    if api_key:
        return None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only localhost is known to stay on this machine
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"listening on {host}, beyond this machine, with no API key: anyone who reaches the port can use "
            f"the model; set --api-key or {API_KEY_ENV}")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
