"""llama.cpp as benchmark peers, run in the same interleaved loop as our methods, on a GGUF of the same weights.

- `llamacpp[:FILE]`: llama.cpp's plain greedy decoding through llama-cpp-python's own `generate`.
- `llamacpp-lookup[:N]`: its prompt-lookup decoding (`LlamaPromptLookupDecoding`, N draft tokens).
- `llama-server[:TYPE][:n=N,m=M,draft_max=D]`: a `llama-server` binary (bench --llama-server PATH) with
  `--spec-type TYPE` (none: plain), greedy over HTTP on loopback; timed from request to response.

Without FILE the peers run the run's own weights, written once as an unquantized GGUF in the method's dtype
(bf16 or f32) into draftsmith's cache: the same work as our methods, at the same precision.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from draftsmith.bench.config import MethodSpec
from draftsmith.bench.method import Method, Output
from draftsmith.errors import ConfigError
from draftsmith.models import LoadedModel, eos_token_ids, gguf_path
from draftsmith.paths import cache_dir

GGUF_DTYPE = {torch.float32: "f32", torch.bfloat16: "bf16"}
SERVER_START_S = 120
LOOKUP_CONTEXT = 2048  # tokens of context for llama-cpp-python's prompt lookup (see llamacpp_method)


def run_gguf(target: LoadedModel) -> Path:
    """The target's weights as an unquantized GGUF in its dtype, written once per source file and dtype."""
    from draftsmith.gguf_export import write_gguf

    source = gguf_path(target.name.split("@")[0])
    if source is None:
        raise ConfigError(f"the llama.cpp methods need a GGUF: '{target.name}' is not one; give the method a file "
                          "(llamacpp:FILE.gguf) or write one with `draftsmith export --format gguf`")
    dtype = GGUF_DTYPE.get(target.dtype)
    if dtype is None:
        raise ConfigError(f"llama.cpp peers run in float32 or bfloat16, not {target.dtype}")
    stat = source.stat()
    tag = hashlib.sha1(f"{source.resolve()}-{stat.st_size}-{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    path = cache_dir() / "gguf" / f"{source.stem}-{tag}-{dtype}.gguf"
    if not path.is_file():
        write_gguf(target.model, path, source, dtype)
    return path


def method_gguf(spec: MethodSpec, target: LoadedModel) -> Path:
    if spec.kind == "llamacpp" and spec.arg:
        path = Path(spec.arg).expanduser()
        if not path.is_file():
            raise ConfigError(f"method '{spec.name}': GGUF file not found: {path}")
        return path
    return run_gguf(target)


def llamacpp_method(spec: MethodSpec, target: LoadedModel, max_new_tokens: int):
    """llama.cpp's own generation loop (llama-cpp-python), plain or with its prompt lookup."""
    from draftsmith.llamacpp import llama_cpp_module

    llama_cpp = llama_cpp_module()
    draft = None
    if spec.kind == "llamacpp-lookup":
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=int(spec.arg or 10))
    path = method_gguf(spec, target)
    context = target.model.config.max_position_embeddings
    options = {}
    if draft is not None:
        # llama-cpp-python keeps every row's logits when it drafts, but sizes that array by the logits_all it
        # was given: without saying logits_all=True it holds n_batch rows and fails past 512 tokens. Those rows
        # cost n_ctx x vocab floats, hence a context capped at LOOKUP_CONTEXT.
        context = min(context, LOOKUP_CONTEXT)
        options["logits_all"] = True
    llm = llama_cpp.Llama(str(path), n_ctx=context, n_threads=torch.get_num_threads(), draft_model=draft,
                          verbose=False, **options)
    stop = eos_token_ids(target.model, target.tokenizer)
    evals = [0]
    plain_eval = llm.eval

    def counted_eval(tokens):  # one llama_decode per call for prompts up to n_batch: the target forwards
        evals[0] += 1
        return plain_eval(tokens)

    llm.eval = counted_eval

    def generate(ids: list[int]) -> Output:
        llm.reset()  # no prefix reuse from the previous call: every method prefills every prompt
        evals[0] = 0
        tokens = []
        start = time.perf_counter()
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            tokens.append(token)
            if token in stop or len(tokens) == max_new_tokens:
                break
        return Output(tokens, time.perf_counter() - start, evals[0])

    return Method(spec.name, generate)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_method(spec: MethodSpec, target: LoadedModel, max_new_tokens: int, binary: str | None):
    """A llama-server process for the run, greedy requests over loopback HTTP."""

    if not binary:
        raise ConfigError(f"method '{spec.name}' needs the llama-server binary: bench --llama-server PATH")
    if not Path(binary).is_file():
        raise ConfigError(f"llama-server binary not found: {binary}")
    port = _free_port()
    command = [binary, "-m", str(run_gguf(target)), "--host", "127.0.0.1", "--port", str(port),
               "-t", str(torch.get_num_threads()), "-c", str(target.model.config.max_position_embeddings),
               "-np", "1", "--no-webui", "--spec-type", spec.arg or "none"]
    flags = {"n": "--spec-ngram-simple-size-n", "m": "--spec-ngram-simple-size-m", "draft_max": "--spec-draft-n-max"}
    for key, value in spec.options.items():
        command += [flags[key], str(value)]
    log = cache_dir() / "llama-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as log_file:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)

    def stop_server() -> None:
        process.terminate()
        process.wait()

    atexit.register(stop_server)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_server()
            raise ConfigError(f"llama-server did not start (exit {process.poll()}); its log: {log}")
        time.sleep(0.5)
    stop = eos_token_ids(target.model, target.tokenizer)

    def generate(ids: list[int]) -> Output:
        body = json.dumps({"prompt": ids, "n_predict": max_new_tokens, "temperature": 0.0, "top_k": 1,
                           "cache_prompt": False, "return_tokens": True, "samplers": ["top_k"]}).encode()
        request = urllib.request.Request(f"{url}/completion", body, {"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            reply = json.load(response)
        seconds = time.perf_counter() - start
        tokens = list(reply.get("tokens", []))
        for i, token in enumerate(tokens):  # the server stops on every end-of-generation token; we on EOS only
            if token in stop:
                tokens = tokens[: i + 1]
                break
        timings = reply.get("timings", {})
        steps = timings.get("predicted_n", len(tokens)) - timings.get("draft_n_accepted", 0)
        return Output(tokens, seconds, max(steps, 1))

    return Method(spec.name, generate, close=stop_server)
