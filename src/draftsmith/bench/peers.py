"""llama.cpp as benchmark peers, run in the same interleaved loop as our methods, on a GGUF of the same weights.

- `llamacpp[:FILE]`: llama.cpp's plain greedy decoding through llama-cpp-python's own `generate`.
- `llamacpp-lookup[:N]`: its prompt-lookup decoding (`LlamaPromptLookupDecoding`, N draft tokens).
- `llama-server[:TYPE][:n=N,m=M,draft_max=D]`: a `llama-server` binary (bench --llama-server PATH, else
  $DRAFTSMITH_LLAMA_SERVER, else PATH) with `--spec-type TYPE` (none: plain), greedy over HTTP on loopback;
  timed from request to response. `llama-server:draft-eagle3[:HEAD]` drafts with one of our EAGLE-3 heads
  (the one shipped for the target without HEAD), exported and converted once by llama.cpp's own converter
  (convert_hf_to_gguf.py of the source the binary was built from) into draftsmith's cache.

Without FILE the peers run the run's own weights: the GGUF file itself where the run multiplies its blocks (a GGUF
target at its own precision, `--dtype auto` on CPU), else written once as an unquantized GGUF in the method's
dtype (bf16 or f32) into draftsmith's cache: the same work as our methods, at the same precision.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
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
    """The GGUF of the run's own weights: the file itself where the run multiplies its blocks as stored (a GGUF
    target at its own precision), else the weights as an unquantized GGUF in the target's dtype, written once
    per source file and dtype."""
    from draftsmith.backends.format_choice import runs_file_blocks
    from draftsmith.gguf_export import write_gguf

    source = gguf_path(target.name.split("@")[0])
    if source is None:
        raise ConfigError(f"the llama.cpp methods need a GGUF: '{target.name}' is not one; give the method a file "
                          "(llamacpp:FILE.gguf) or write one with `draftsmith export --format gguf`")
    if "@" not in target.name and runs_file_blocks(target.engine_model):
        return source
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


def llamacpp_method(spec: MethodSpec, target: LoadedModel, max_new_tokens: int, ignore_eos: bool = False):
    """llama.cpp's own generation loop (llama-cpp-python), plain or with its prompt lookup."""
    from draftsmith.backends.llamacpp import llama_cpp_module

    llama_cpp = llama_cpp_module()
    draft = None
    if spec.kind == "llamacpp-lookup":
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=int(spec.arg or 10))
    path = method_gguf(spec, target)
    context = target.engine_model.config.max_position_embeddings
    options = {}
    if draft is not None:
        # llama-cpp-python keeps every row's logits when it drafts, but sizes that array by the logits_all it
        # was given: without saying logits_all=True it holds n_batch rows and fails past 512 tokens. Those rows
        # cost n_ctx x vocab floats, hence a context capped at LOOKUP_CONTEXT.
        context = min(context, LOOKUP_CONTEXT)
        options["logits_all"] = True
    llm = llama_cpp.Llama(str(path), n_ctx=context, n_threads=torch.get_num_threads(), draft_model=draft,
                          verbose=False, **options)
    stop = set() if ignore_eos else eos_token_ids(target.engine_model, target.tokenizer)
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


def llama_server_binary(given: str | None = None) -> str | None:
    """The llama-server binary: the one given, else $DRAFTSMITH_LLAMA_SERVER, else `llama-server` on PATH."""
    return given or os.environ.get("DRAFTSMITH_LLAMA_SERVER") or shutil.which("llama-server")


def llama_cpp_converter(binary: str) -> Path:
    """convert_hf_to_gguf.py of the llama.cpp source the binary was built from (named by its build folder's
    CMake cache), or of the source folder $DRAFTSMITH_LLAMA_CPP names."""
    source = os.environ.get("DRAFTSMITH_LLAMA_CPP")
    cmake_cache = Path(binary).resolve().parent.parent / "CMakeCache.txt"
    if not source and cmake_cache.is_file():
        source = next((line.partition("=")[2] for line in cmake_cache.read_text().splitlines()
                       if line.startswith("CMAKE_HOME_DIRECTORY:")), None)
    converter = Path(source or ".") / "convert_hf_to_gguf.py"
    if not source or not converter.is_file():
        raise ConfigError(f"llama.cpp's convert_hf_to_gguf.py not found (looked in {source or 'no source folder'}): "
                          "set DRAFTSMITH_LLAMA_CPP to the llama.cpp source folder the llama-server was built from")
    return converter


def eagle3_gguf(head: Path, target: LoadedModel, converter: Path) -> Path:
    """Our EAGLE-3 head as llama.cpp's converter writes it (for `-md`), in the target's dtype: exported, then
    converted once per head file, target and dtype, into draftsmith's cache."""
    from draftsmith.export import export_eagle3, write_target_folder

    weights = Path(head) / "head.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{head} is not a head folder: train one with `draftsmith train heads --kind eagle3`")
    dtype = GGUF_DTYPE.get(target.dtype, "f32")
    stat = weights.stat()
    key = f"{weights.resolve()}-{stat.st_size}-{stat.st_mtime_ns}-{target.name.split('@')[0]}-{dtype}"
    path = cache_dir() / "gguf" / f"eagle3-{hashlib.sha1(key.encode()).hexdigest()[:10]}-{dtype}.gguf"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        export_eagle3(head, Path(tmp) / "head", torch.float32)
        write_target_folder(target.model, target.tokenizer, Path(tmp) / "target")
        partial = Path(tmp) / "head.gguf"
        done = subprocess.run([sys.executable, str(converter), str(Path(tmp) / "head"), "--target-model-dir",
                               str(Path(tmp) / "target"), "--outfile", str(partial), "--outtype", dtype],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise ConfigError(f"llama.cpp's converter failed on the EAGLE-3 head {head}: "
                              f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}")
        shutil.move(partial, path)
    return path


def server_method(spec: MethodSpec, target: LoadedModel, max_new_tokens: int, binary: str | None,
                  model_gguf: Path | None = None, ignore_eos: bool = False):
    """A llama-server process for the run (on `model_gguf`, default the run's weights), greedy requests over
    loopback HTTP."""

    binary = llama_server_binary(binary)
    if not binary:
        raise ConfigError(f"method '{spec.name}' needs the llama-server binary: bench --llama-server PATH, or "
                          "DRAFTSMITH_LLAMA_SERVER, or llama-server on PATH")
    if not Path(binary).is_file():
        raise ConfigError(f"llama-server binary not found: {binary}")
    spec_type, _, head = (spec.arg or "none").partition(":")
    draft = []
    if spec_type == "draft-eagle3":
        from draftsmith.artifacts import shipped_head

        head_dir = Path(head) if head else shipped_head("eagle3", target)
        draft = ["-md", str(eagle3_gguf(head_dir, target, llama_cpp_converter(binary)))]
    port = _free_port()
    command = [binary, "-m", str(model_gguf or run_gguf(target)), *draft, "--host", "127.0.0.1", "--port", str(port),
               "-t", str(torch.get_num_threads()), "-c", str(target.engine_model.config.max_position_embeddings),
               "-np", "1", "--no-webui", "--spec-type", spec_type]
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
    stop = set() if ignore_eos else eos_token_ids(target.engine_model, target.tokenizer)

    def generate(ids: list[int]) -> Output:
        body = json.dumps({"prompt": ids, "n_predict": max_new_tokens, "temperature": 0.0, "top_k": 1,
                           "cache_prompt": False, "return_tokens": True, "samplers": ["top_k"],
                           "ignore_eos": ignore_eos}).encode()
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
