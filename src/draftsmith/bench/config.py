"""What a benchmark run is asked to do: the method specs and the run's settings, checked before anything loads.

A method spec names one way of decoding: ours (`plain`, `ngram[:k=8,min_n=1,max_n=4]`, `model:PATH[:k=4]`,
`student[:DIR][:k=4]` (the shipped distilled student), `mag[:FILE][:k=8]` (prompt lookup + bigram chain),
`cascade[:K-MATRIX|:upstream[-lL]|:FILE.toml]` (CS-Drafting, drafters/cascade.py); `layerskip[:DIR|:auto][:k=4]` (self-speculation:
the target skipping layers by routers, the shipped ones without DIR, or by a measured fixed set);
`prune=1` on a tree drafter: the shipped acceptance predictor cuts a tree to one path where that is expected to
pay (lossless), `prune=2` cuts every tree (SpaDec's rule);
`lossy_sparse=1`: LOSSY, the target verifies with the shipped routers skipping layers (SpaDec's sparse mode;
`routers=DIR` takes other routers);
`adaptive=1` lets the engine choose each step's draft length up to k; `eagle[:DIR][:k=32,depth=6,top_k=8]`
`medusa[:DIR][:k=32]` and `ctc[:DIR][:k=32,top_k=4,beams=16,levels=1]`, feature heads drafting trees of at most k nodes,
the shipped head without DIR;
`graphs=0` / `graphs=1`: the target's steps eager / replayed from captured CUDA graphs (default: captured on
CUDA below fp32);
`fused=0` / `fused=1`: the target's lean forward with its small operations eager / through the fused CPU kernels
(default: fused on CPU below fp32; fused.py);
`weights=NAME`: the lean forward's weight format (`--weights`: fastest, stored, transposed, onednn, fp16, fp16-fused,
bf16-fused; int8 /
int4 quantized, lossy) or
transformers' generate on the same model (`hf-greedy`, `hf-prompt-lookup[:N]`, `hf-assisted:PATH`), or
llama.cpp's own decoding (`llamacpp[:FILE]`, `llamacpp-lookup[:N]`, `llama-server[:TYPE][:n=N,m=M]`; see
bench/peers.py). `llamacpp=1` runs one of ours (plain, ngram, model) with llama.cpp as the target backend.
A suffix `@DTYPE` (`@bf16`, `@fp32`, ...) runs the method on the target cast to that dtype; without it the
method runs in the run's --dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from draftsmith.bench.workloads import WORKLOADS
from draftsmith.errors import ConfigError

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}

BASELINE = "hf-greedy"  # speedups are measured against it, exactness against its tokens
PLAIN = "plain"  # our loop without a drafter: its seconds per step set the bound
DEFAULT_METHODS = ("hf-greedy", "hf-prompt-lookup:10", "plain", "ngram:k=8")
# method kind -> the key=value options its spec accepts
OPTIONS = {"plain": ("compile", "graphs", "fused", "weights", "llamacpp", "lossy_sparse", "routers"),
           "ngram": ("k", "min_n", "max_n", "branches", "adaptive", "compile", "graphs", "fused", "weights", "llamacpp"),
           "model": ("k", "adaptive", "compile", "graphs", "fused", "weights", "llamacpp"),
           "student": ("k", "adaptive", "compile", "graphs", "fused", "weights", "llamacpp"),
           "mag": ("k", "adaptive", "compile", "graphs", "fused", "weights", "llamacpp"),
           "cascade": ("k", "compile", "graphs", "fused", "weights"),
           "eagle": ("k", "draft_graphs", "depth", "top_k", "lookup", "compile", "graphs", "fused", "weights", "prune", "lossy_sparse", "routers"),
           "eagle3": ("k", "draft_graphs", "depth", "top_k", "lookup", "compile", "graphs", "fused", "weights"),
           "medusa": ("k", "draft_graphs", "compile", "graphs", "fused", "weights", "prune", "lossy_sparse", "routers"),
           "ctc": ("k", "draft_graphs", "top_k", "beams", "levels", "compile", "graphs", "fused", "weights", "prune", "lossy_sparse", "routers"),
           "layerskip": ("k", "adaptive", "weights", "lossy_sparse", "routers"), "hf-greedy": (),
           "hf-prompt-lookup": (), "hf-assisted": (),
           "llamacpp": (), "llamacpp-lookup": (), "llama-server": ("n", "m", "draft_max"),
           # the collab workload's (bench/collab.py); fallback, rollback and threshold take decimals
           "small": (), "small-draft": ("k",), "bild": ("k", "fallback", "rollback"), "collab": ("k", "threshold")}
PEERS = ("llamacpp", "llamacpp-lookup", "llama-server")  # llama.cpp's own decoding (bench/peers.py)
DEFAULT_K = {"ngram": 8, "model": 4, "student": 4, "mag": 8, "cascade": 16, "eagle": 32, "eagle3": 32, "medusa": 32,
             "ctc": 32, "layerskip": 4}  # heads: tree nodes, at most; cascade: its k-matrix's row 0 bounds it too


@dataclass(frozen=True)
class MethodSpec:
    name: str  # the spec as given; also the method's name in the report
    kind: str  # a key of OPTIONS
    arg: str | None = None  # model path, or prompt lookup's draft length
    options: dict[str, float | str] = field(default_factory=dict)  # whole numbers as int; weights: a name
    dtype: str | None = None  # from an `@DTYPE` suffix: canonical torch dtype name, None = the run's dtype


def parse_method(spec: str) -> MethodSpec:
    """`plain`, `ngram[:k=8,max_n=4]`, `model:PATH[:k=4]`, `hf-greedy`, `hf-prompt-lookup[:N]`, `hf-assisted:PATH`."""
    spec = spec.strip()
    body, _, dtype = spec.partition("@")
    if dtype and dtype not in DTYPE_NAMES:
        raise ConfigError(f"method '{spec}': unknown dtype '{dtype}' (use {', '.join(DTYPE_NAMES)})")
    parts = body.split(":")
    n_options = 0
    while n_options < len(parts) - 1 and "=" in parts[-1 - n_options]:  # trailing key=value parts
        n_options += 1
    kind, arg = parts[0], ":".join(parts[1 : len(parts) - n_options]) or None
    if kind not in OPTIONS:
        raise ConfigError(f"unknown method '{spec}': use {', '.join(OPTIONS)} (e.g. ngram:k=8, model:PATH:k=4, "
                          "hf-prompt-lookup:10, hf-assisted:PATH)")
    options: dict[str, float | str] = {}
    for item in ",".join(parts[len(parts) - n_options :]).split(",") if n_options else ():
        key, _, value = item.partition("=")
        if key == "weights" and key in OPTIONS[kind]:
            from draftsmith.backends.format_choice import WEIGHT_CHOICES

            if value not in WEIGHT_CHOICES:
                raise ConfigError(f"method '{spec}': weights={value} is not a weight format "
                                  f"(use {', '.join(WEIGHT_CHOICES)})")
            options[key] = value
            continue
        if key == "routers" and key in OPTIONS[kind]:  # a folder (commas and colons would split the spec)
            if not Path(value).is_dir():
                raise ConfigError(f"method '{spec}': routers={value} is not a folder of trained routers")
            options[key] = value
            continue
        decimal = key in ("fallback", "rollback", "threshold")
        if key not in OPTIONS[kind] or not value.lstrip("-").replace(".", "", decimal).isdigit():
            allowed = ", ".join(f"{o}={'NAME' if o == 'weights' else 'DIR' if o == 'routers' else 'N'}" for o in OPTIONS[kind]) or "no options"
            raise ConfigError(f"bad option '{item}' in method '{spec}': {kind} takes {allowed}")
        options[key] = float(value) if decimal else int(value)
    if kind in ("model", "hf-assisted") and not arg:
        raise ConfigError(f"method '{spec}' needs a draft model: {kind}:PATH")
    if kind in ("hf-prompt-lookup", "llamacpp-lookup") and arg is not None and not arg.isdigit():
        raise ConfigError(f"method '{spec}': give the number of draft tokens, e.g. {kind}:10")
    if kind in ("plain", "ngram", "hf-greedy") and arg:
        raise ConfigError(f"method '{spec}' takes no argument after '{kind}:' (only key=value options)")
    if "routers" in options and not options.get("lossy_sparse"):
        raise ConfigError(f"method '{spec}': routers=DIR is for the lossy sparse verifier: add lossy_sparse=1")
    if options.get("k", 1) < 1:
        raise ConfigError(f"method '{spec}': k must be >= 1 (use 'plain' for no drafting)")
    return MethodSpec(spec, kind, arg, options, DTYPE_NAMES.get(dtype))


def split_methods(text: str) -> list[str]:
    """A comma list of method specs, where a spec's own key=value options, or the rest of a cascade's k-matrix
    (a part starting with a digit: no method name does), may follow it after commas too:
    "plain,ngram:k=16,adaptive=1@bf16,cascade:4,2/0,3" is ["plain", "ngram:k=16,adaptive=1@bf16", "cascade:4,2/0,3"]."""
    methods: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if methods and (("=" in part and ":" not in part) or part[:1].isdigit()):
            methods[-1] += f",{part}"
        elif part:
            methods.append(part)
    return methods


@dataclass
class BenchConfig:
    target: str = "smollm2"
    workload: str = "humaneval"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    limit: int = 20
    max_new_tokens: int = 128
    ignore_eos: bool = False  # every generation runs to max_new_tokens: equal lengths across libraries
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    pass_at_1: bool = True  # run HumanEval tests in the sandbox after the timed loop
    allow_unsandboxed: bool = False  # run them even where no isolation works (limits and audit hook only)
    llama_server: str | None = None  # a llama-server binary, for the llama-server methods
    out: str | None = None  # default: bench-results/<timestamp>

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS and self.workload.partition(":")[0] != "collab":
            raise ConfigError(f"unknown workload '{self.workload}': use {', '.join(WORKLOADS)}")
        if self.limit < 1:
            raise ConfigError(f"limit must be >= 1 (prompts to run), got {self.limit}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.methods:
            raise ConfigError("give at least one method, e.g. --methods hf-greedy,plain,ngram:k=8")
        names = [parse_method(m).name for m in self.methods]
        if len(set(names)) < len(names):
            raise ConfigError(f"a method is listed twice in {', '.join(names)}")
