"""Run a workload through several decoding methods in one process, interleaved per prompt.

Every method sees the same model, prompts and token budget. After a warm-up (the first prompt through every
method, timings dropped), each prompt goes through every method in turn, the order rotated by one per prompt
(A B C, B C A, C A B, ...), so that machine noise and cache effects hit all methods alike and no method
always runs first. Scoring (pass@1 in the sandbox, EM / ES) happens after the timed loop.
"""

from __future__ import annotations

import copy
import gc
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from draftsmith.acceptance import SamplingConfig
# importing bench.collab also registers the collab workload's tasks
from draftsmith.bench.collab import (COLLAB_METHODS, DEFAULT_COLLAB_METHODS, collab_method, domain_table,
                                     folder_diagnostics, workload_domains, write_domain_report)
from draftsmith.bench.config import (BASELINE, DEFAULT_K, DEFAULT_METHODS, PEERS, PLAIN, BenchConfig, MethodSpec,
                                     parse_method)
from draftsmith.bench.method import Method, Output, sync
from draftsmith.bench.peers import llamacpp_method, server_method
from draftsmith.bench.report import MethodSummary, PromptRecord, load_report, summarize, write_report
from draftsmith.bench.sandbox import SandboxConfig, available_isolation
from draftsmith.collab.domains import resolve_domain
from draftsmith.bench.workloads import INSTRUCT, Score, Task, completion, load_tasks, prompt_ids, score
from draftsmith.builder import build_engine
from draftsmith.backends.protocol import BackendConfig
from draftsmith.drafters.registry import build_drafter
from draftsmith.engine import GenerationConfig, Stats
from draftsmith.errors import ConfigError, DraftsmithError
from draftsmith.models import LoadedModel, load_model

MEMORY_NOTE = {
    "cpu": "peak resident memory (VmHWM, reset before each call through /proc/self/clear_refs) of the whole "
           "process during the method's calls, in MB: every loaded model is included, so methods differ only "
           "by what their generation adds",
    "cuda": "torch.cuda.max_memory_allocated during the method's calls (peak reset before each call), in MB: "
            "tensors of every loaded model included",
}
STEPS_NOTE = ("our methods count target forwards after a prefill that yields no token; HF methods count every "
              "target forward (a forward hook), since HF's prefill yields the first token: both count the forwards "
              "that yield tokens, so tau = tokens / steps compares alike (plain and hf-greedy: 1)")
LEGEND = (
    "speedup: {baseline} total time / the method's, and the mean of per-prompt ratios; 95% CI: a t interval of "
    "the per-prompt ratios' geometric mean (one holding 1.00x does not tell the two apart). tau: generated tokens per "
    "target step. draft / verify: share of the generation time, and ms per target step. bound: the speedup over "
    "plain decoding that tau allows at the measured draft + verify cost per step; efficiency: achieved / bound. "
    "exact: output equal to {reference}'s token for token. Target steps: {steps}. Peak MB: {memory}. "
    "Warm-up (untimed): {warmup_prompt} through every method."
)


# bench option prune=N: the shipped predictor cuts trees never, where the path is expected to pay, or always
PRUNING = {0: "none", 1: "predictor", 2: "predictor-path"}


def _engine_method(spec: MethodSpec, target: LoadedModel, max_new_tokens: int, seed: int,
                   ignore_eos: bool = False) -> Method:
    options = dict(spec.options)
    k = options.pop("k", DEFAULT_K.get(spec.kind, 0))
    adaptive = bool(options.pop("adaptive", 0))
    compile = bool(options.pop("compile", 0))
    graphs = bool(options.pop("graphs")) if "graphs" in options else None  # None: the backend's default
    if "draft_graphs" in options:  # a feature head's drafting captured or eager, apart from the target's steps
        options["graphs"] = bool(options.pop("draft_graphs"))
    elif graphs is not None:
        options["graphs"] = graphs
    fused = bool(options.pop("fused")) if "fused" in options else None
    drafter_spec = {"plain": "none", "ngram": "ngram", "model": f"model:{spec.arg}"}.get(spec.kind)
    if spec.kind in ("eagle", "eagle3", "medusa", "ctc", "student", "mag", "cascade", "layerskip"):
        drafter_spec = f"{spec.kind}:{spec.arg}" if spec.arg else spec.kind
    prune = options.pop("prune", 0)
    if prune not in PRUNING:
        raise ConfigError(f"prune={prune}: use 0 (none), 1 (where the path pays) or 2 (always: SpaDec's rule)")
    weights = options.pop("weights", "auto")
    if options.pop("llamacpp", 0):  # our loop and drafter, llama.cpp scoring: the same weights as a GGUF
        from draftsmith.bench.peers import run_gguf
        from draftsmith.backends.llamacpp import LlamaCppModel, llama_cpp_module

        llama_cpp_module()  # not installed: say how, before writing a GGUF for it
        model = LlamaCppModel(run_gguf(target), target.model.config)
        target = LoadedModel(model=model, tokenizer=target.tokenizer, name=target.name)
    # token ids in and out, like HF generate: no tokenizer, so no incremental detokenizing inside the timing
    engine = build_engine(target, drafter_spec, BackendConfig(compile=compile, weights=weights, graphs=graphs,
                                                              fused=fused),
                          prune=PRUNING[prune],
                          lossy_sparse_verify=bool(options.pop("lossy_sparse", 0)), routers=options.pop("routers", ""),
                          tokenizer=False, **options)
    config = GenerationConfig(max_new_tokens=max_new_tokens, k=k, adaptive=adaptive, sampling=SamplingConfig(seed=seed),
                              stop_on_eos=not ignore_eos)

    def generate(ids: list[int]) -> Output:
        sync(target.device)
        start = time.perf_counter()
        result = engine.generate(ids, config)
        sync(target.device)
        seconds = time.perf_counter() - start
        return Output(result.tokens, seconds, result.stats.target_steps, result.stats)

    weights = getattr(engine.runner.lm, "weights", None)  # the lean forward's; other backends have none
    return Method(spec.name, generate, engine.runner.compile_s, weight_format=getattr(weights, "name", None))


def _hf_method(spec: MethodSpec, target: LoadedModel, max_new_tokens: int, ignore_eos: bool = False) -> Method:
    model = target.model
    generation = copy.deepcopy(model.generation_config)  # the model's own, greedy, our length
    generation.update(do_sample=False, max_new_tokens=max_new_tokens)
    if ignore_eos:  # no end-of-sequence token: generate stops at max_new_tokens only
        generation.eos_token_id = []  # None would be filled in again from the model's defaults
    kwargs: dict[str, Any] = {"generation_config": generation}
    if spec.kind == "hf-prompt-lookup":
        generation.prompt_lookup_num_tokens = int(spec.arg or 10)
    elif spec.kind == "hf-assisted":  # loaded and checked like our model drafter, then handed to HF
        kwargs["assistant_model"] = build_drafter(f"model:{spec.arg}", target).model

    @torch.inference_mode()
    def generate(ids: list[int]) -> Output:
        input_ids = torch.tensor([ids], device=model.device)
        forwards = [0]
        hook = model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        try:
            sync(target.device)
            start = time.perf_counter()
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
            tokens = out[0, len(ids) :].tolist()
            seconds = time.perf_counter() - start
        finally:
            hook.remove()
        return Output(tokens, seconds, forwards[0])

    return Method(spec.name, generate)


def build_method(
    spec: MethodSpec | str, target: LoadedModel, max_new_tokens: int, seed: int = 0, llama_server: str | None = None,
    ignore_eos: bool = False,
) -> Method:
    """A callable method on `target`: our engine (plain / a drafter), transformers' generate, or llama.cpp's.
    `ignore_eos`: every generation runs to max_new_tokens (the end-of-sequence token does not stop it)."""
    spec = parse_method(spec) if isinstance(spec, str) else spec
    if spec.kind.startswith("hf-"):
        return _hf_method(spec, target, max_new_tokens, ignore_eos)
    if spec.kind == "llama-server":
        return server_method(spec, target, max_new_tokens, llama_server, ignore_eos=ignore_eos)
    if spec.kind in PEERS:
        return llamacpp_method(spec, target, max_new_tokens, ignore_eos)
    return _engine_method(spec, target, max_new_tokens, seed, ignore_eos)


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window; False where this machine cannot (then no peak is reported)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets the process's RSS high-water mark
        return True
    except OSError:
        return False


def peak_memory_mb(device: torch.device) -> float | None:
    """The peak since reset_peak_memory (see MEMORY_NOTE for what it covers)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        found = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(found.group(1)) / 1024 if found else None


@dataclass
class Call:
    method: str
    task_id: str
    position: int  # where the method ran in this prompt's order (0 = first)
    output: Output
    peak_memory_mb: float | None


def method_order(methods: list[Method], index: int) -> list[Method]:
    """Prompt `index` runs the methods rotated left by `index`: each goes first equally often."""
    shift = index % len(methods)
    return methods[shift:] + methods[:shift]


def run_interleaved(
    methods: list[Method],
    prompts: list[tuple[str, list[int]]],
    device: torch.device = torch.device("cpu"),
    progress: Callable[[str, bool], None] | None = None,
    failures: dict[str, str] | None = None,
) -> list[Call]:
    """Warm up every method on the first prompt (dropped), then run every prompt through every method in a
    rotating order. `progress(description, finished)` is called before and after each call.

    With `failures`, a method that raises is recorded there (prompt and error), leaves the rotation and loses
    its calls, so that one broken method does not cost the others' hour of measurements; without, it raises."""
    calls = []
    schedule = [(-1, prompts[0])] + list(enumerate(prompts))
    for index, (task_id, ids) in schedule:
        running = [m for m in methods if failures is None or m.name not in failures]
        if not running:
            break
        for position, method in enumerate(running if index < 0 else method_order(running, index)):
            what = f"{method.name} on {task_id}" + (" (warm-up)" if index < 0 else "")
            if progress:
                progress(what, False)
            gc.collect()  # outside the timing: no method pays for another's garbage
            measured = reset_peak_memory(device)
            if method.select is not None:
                method.select(task_id if index >= 0 else prompts[0][0])
            try:
                output = method.generate(ids)
            except Exception as e:  # any method's failure, ours or a peer library's
                if failures is None:
                    raise
                failures[method.name] = f"on {task_id}: {type(e).__name__}: {e}".splitlines()[0]
                continue
            peak = peak_memory_mb(device) if measured else None
            if index >= 0:
                calls.append(Call(method.name, task_id, position, output, peak))
            if progress:
                progress(what, True)
    return [c for c in calls if failures is None or c.method not in failures]


def make_records(
    calls: list[Call], tasks: list[Task], decode: Callable[[list[int]], str], run_tests: bool = True,
    sandbox: SandboxConfig = SandboxConfig(),
) -> list[PromptRecord]:
    """One PromptRecord per call, with its output tokens (exactness is judged in `summarize`) and the task's
    scores. Each distinct completion of a task is scored once (HumanEval tests run in a sandboxed process)."""
    by_id = {t.task_id: t for t in tasks}
    scores: dict[tuple[str, str], Score] = {}
    records = []
    for c in calls:
        task, stats = by_id[c.task_id], c.output.stats or Stats()
        answer = completion(task, decode(c.output.tokens))
        if (c.task_id, answer) not in scores:
            scores[c.task_id, answer] = score(task, answer, run_tests, sandbox)
        s = scores[c.task_id, answer]
        records.append(PromptRecord(
            method=c.method, prompt_id=c.task_id, new_tokens=len(c.output.tokens), seconds=c.output.seconds,
            target_steps=c.output.target_steps, proposed=stats.proposed, accepted=stats.accepted,
            draft_seconds=stats.draft_s, verify_seconds=stats.verify_s, draft_nodes=stats.draft_nodes,
            accepted_lengths=stats.accepted_lengths or None, drafter_stats=stats.drafter or None,
            peak_memory_mb=c.peak_memory_mb,
            output_tokens=c.output.tokens,
            passed=s.passed, sandbox=s.sandbox, exact_match=s.exact_match, edit_similarity=s.edit_similarity,
            completion=answer, position=c.position,
        ))
    return records


@dataclass
class BenchResult:
    records: list[PromptRecord]
    summaries: list[MethodSummary]
    metadata: dict[str, Any]
    notes: str  # what the columns mean, as report.md says under the table
    paths: dict[str, Path]


def report_notes(metadata: dict[str, Any]) -> str:
    notes = LEGEND.format(steps=metadata["target_steps"], memory=metadata["peak_memory"], **metadata)
    floors = ", ".join(f"{f['floor_tokens_per_s']:.0f} tok/s in {d} ({f['weight_mb']:.0f} MB of weights)"
                       for d, f in metadata["weight_read_floor"].items())
    notes += (f" Weight-read floor of this machine (a one-token step that only reads every weight once, at "
              f"{metadata['read_bandwidth_gb_s']:.1f} GB/s measured): {floors}.")
    if any("@" in method for method in metadata["methods"]):
        notes += (" A method@dtype runs the target cast to that dtype; its exact column is its agreement with "
                  "greedy decoding in the same dtype (hf-greedy@dtype when the run has it). Below float32 that "
                  "agreement is not 100% even for lossless methods: a forward over several tokens (a verified "
                  "draft) and each kernel round differently from one-token steps, a near-tie between two "
                  "tokens can flip, and the texts part from there; float32 shows the method itself is exact.")
    if metadata.get("weight_formats"):
        formats = ", ".join(f"{name} {fmt}" for name, fmt in metadata["weight_formats"].items())
        notes += f" Weight formats (the lean forward's; timed once per machine unless named): {formats}."
    if metadata.get("compile_seconds"):
        compiled = ", ".join(f"{name} {s:.0f} s" for name, s in metadata["compile_seconds"].items())
        notes += f" torch.compile time before the run (not in tok/s): {compiled}."
    if metadata.get("workload") == INSTRUCT:
        notes += (" Instruct form: each prompt is the chat template over a request to complete the function; "
                  "pass@1 tests the reply's first Python code block (the whole reply without one), after the "
                  "prompt's imports and helpers when it defines the function, else as the body after the prompt.")
    if metadata.get("sandbox"):
        notes += f" HumanEval tests ran in the sandbox with isolation: {', '.join(metadata['sandbox'])}."
        if "none" in metadata["sandbox"]:
            notes += " (none: no namespaces and no uid change, allowed by --allow-unsandboxed.)"
    if metadata.get("failed_methods"):
        failed = "; ".join(f"{name} {why}" for name, why in metadata["failed_methods"].items())
        notes += f" FAILED, left out of the table (the others ran on): {failed}."
    if metadata["truncated_prompts"]:
        notes += (" Prompts cut to their last tokens to fit the model's context: "
                  f"{', '.join(metadata['truncated_prompts'])}.")
    return notes


def fit_prompt(ids: list[int], model: torch.nn.Module, max_new_tokens: int) -> list[int]:
    """Keep the prompt's last tokens when prompt + budget exceed the model's context."""
    context = getattr(model.config, "max_position_embeddings", None)
    if not context or len(ids) + max_new_tokens <= context:
        return ids
    if max_new_tokens >= context:
        raise ConfigError(f"max_new_tokens ({max_new_tokens}) must be below the model's context ({context})")
    return ids[len(ids) + max_new_tokens - context :]


def cpu_model() -> str:
    try:
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        found = None
    return found.group(1).strip() if found else platform.processor() or platform.machine()


def run_metadata(config: BenchConfig, target: LoadedModel, **extra: Any) -> dict[str, Any]:
    import transformers

    device = target.device
    return {
        "model": target.name, "device": str(device), "dtype": str(target.dtype).removeprefix("torch."),
        "workload": config.workload, "methods": list(config.methods), "limit": config.limit,
        "max_new_tokens": config.max_new_tokens, "ignore_eos": config.ignore_eos, "seed": config.seed, "pass_at_1": config.pass_at_1,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "command": shlex.join(sys.orig_argv), "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "peak_memory": MEMORY_NOTE.get(device.type, "not measured"), "target_steps": STEPS_NOTE,
        **extra,
    }


def read_bandwidth_gb_s(device: torch.device, megabytes: int = 512) -> float:
    """Memory read bandwidth: the best of a few full reads (sums) of a buffer much larger than the caches."""
    buffer = torch.ones(megabytes * 2**20 // 4, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        buffer.sum()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def weight_read_floor(model: torch.nn.Module, bandwidth_gb_s: float) -> dict[str, float]:
    """Tokens/s if each one-token step did nothing but read every weight once (tied weights counted once), in the
    precision the step reads them: a GGUF target at its own precision reads its linears' blocks."""
    from draftsmith.backends.format_choice import runs_file_blocks

    blocks, seen, weight_bytes = runs_file_blocks(model), set(), 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                stored = module.gguf_blocks() if blocks and hasattr(module, "gguf_blocks") else p
                weight_bytes += stored.numel() * stored.element_size()
    return {"weight_mb": weight_bytes / 2**20, "floor_tokens_per_s": bandwidth_gb_s * 1e9 / weight_bytes}


def cast(target: LoadedModel, dtype: str) -> LoadedModel:
    """The same weights in another dtype (a copy: the run's own model stays as it is)."""
    import copy

    model = copy.deepcopy(target.model).to(getattr(torch, dtype))
    # a dtype asked for runs in it, as `--dtype` does at load: not the GGUF file's blocks the copy still holds
    # (a 4-bit target's own dtype is bfloat16: `@bf16` names the run's target; `weights=fastest` its bf16 weights)
    model.gguf_blocks_default = False
    return LoadedModel(model=model, tokenizer=target.tokenizer, name=f"{target.name}@{dtype}")


def same_dtype_baselines(specs: list[MethodSpec], run_dtype: str) -> dict[str, str]:
    """Method -> the run's HF greedy method in that method's dtype, where the run has one."""
    dtype_of = {s.name: s.dtype or run_dtype for s in specs}
    hf_greedy_in = {dtype_of[s.name]: s.name for s in specs if s.kind == "hf-greedy"}
    return {s.name: hf_greedy_in[dtype_of[s.name]] for s in specs if dtype_of[s.name] in hf_greedy_in}


def rereport(folder: Path, baseline: str, out: Path | None = None) -> BenchResult:
    """A run's report recomputed from its report.json with another method as the baseline (speedups and their
    intervals against it: e.g. a method against an identical twin of its reference, to see the noise floor),
    written to `out` (default FOLDER/vs-BASELINE)."""
    records, metadata = load_report(folder)
    names = list(dict.fromkeys(r.method for r in records))
    if baseline not in names:
        raise ConfigError(f"'{baseline}' is not a method of {folder} (its methods: {', '.join(names)})")
    specs = [parse_method(name) for name in names]
    summaries = summarize(records, baseline=baseline, plain=PLAIN if PLAIN in names else None,
                          reference=metadata.get("reference"),
                          same_dtype_baseline=same_dtype_baselines(specs, metadata["dtype"]))
    metadata = {**metadata, "baseline": baseline}
    notes = report_notes(metadata)
    out = out or folder / f"vs-{baseline.replace(':', '_').replace('/', '_')}"
    return BenchResult(records, summaries, metadata, notes, write_report(out, records, summaries, metadata, notes))


def run_bench(
    config: BenchConfig,
    console: Any = None,
    target: LoadedModel | None = None,
    tasks: list[Task] | None = None,
) -> BenchResult:
    """Load, run the interleaved loop, score, summarise and write report.json / report.md / plots.

    `console` (a rich Console) shows progress; `target` and `tasks` replace loading the model and workload.
    """
    collab = config.workload.partition(":")[0] == "collab"
    specs = [parse_method(m) for m in (collab_methods(config.methods) if collab else config.methods)]
    tasks = tasks if tasks is not None else load_tasks(config.workload, config.limit)
    tasks = tasks if collab else tasks[: config.limit]  # collab: limit is per domain
    if not tasks:
        raise ConfigError(f"the workload '{config.workload}' has no tasks to run")
    sandbox = SandboxConfig(allow_unisolated=config.allow_unsandboxed)
    if config.pass_at_1 and any(t.problem is not None for t in tasks):
        available_isolation(sandbox)  # SandboxUnavailable now, not after the whole decoding loop
    if target is None:
        with _status(console, f"loading {config.target}"):
            target = load_model(config.target, device=config.device, dtype=config.dtype)
    # prompts first: a workload this tokenizer cannot serve (no chat template) stops before methods compile
    prompts, truncated = [], []
    for t in tasks:
        ids = prompt_ids(t, target.tokenizer)
        fitted = fit_prompt(ids, target.engine_model, config.max_new_tokens)
        prompts.append((t.task_id, fitted))
        if len(fitted) < len(ids):
            truncated.append(t.task_id)
    run_dtype = str(target.dtype).removeprefix("torch.")
    dtype_of = {s.name: s.dtype or run_dtype for s in specs}
    methods: list[Method] = []
    try:
        with _status(console, "building methods"):
            targets = {d: target if d == run_dtype else cast(target, d) for d in set(dtype_of.values())}
            if collab:

                domains = [resolve_domain(d).name for d in workload_domains(config.workload)]
            for s in specs:
                if collab:
                    methods.append(collab_method(s, targets[dtype_of[s.name]], domains, config.max_new_tokens))
                    continue
                methods.append(build_method(s, targets[dtype_of[s.name]], config.max_new_tokens, config.seed,
                                            config.llama_server, config.ignore_eos))
        failures: dict[str, str] = {}
        calls = _decode_all(methods, prompts, target.device, console, config.seed, failures)
    finally:
        for method in methods:
            if method.close is not None:
                method.close()
    same_dtype_baseline = same_dtype_baselines(specs, run_dtype)
    names = [m.name for m in methods if m.name not in failures]
    if not names:
        raise DraftsmithError("every method failed: " + "; ".join(f"{m} {why}" for m, why in failures.items()))
    baseline = BASELINE if BASELINE in names else names[0]
    reference = BASELINE if BASELINE in names else PLAIN if PLAIN in names else names[0]
    with _status(console, "scoring (HumanEval tests run in a sandboxed process)"):
        records = make_records(calls, tasks, lambda ids: target.tokenizer.decode(ids, skip_special_tokens=True),
                               run_tests=config.pass_at_1, sandbox=sandbox)
    summaries = summarize(records, baseline=baseline, plain=PLAIN if PLAIN in names else None, reference=reference,
                          same_dtype_baseline=same_dtype_baseline)
    bandwidth = read_bandwidth_gb_s(target.device)
    floors = {d: weight_read_floor(t.engine_model, bandwidth) for d, t in targets.items()}
    metadata = run_metadata(config, target, baseline=baseline, reference=reference,
                            warmup_prompt=tasks[0].task_id, truncated_prompts=truncated,
                            sandbox=sorted({r.sandbox for r in records if r.sandbox}),
                            read_bandwidth_gb_s=bandwidth, weight_read_floor=floors,
                            compile_seconds={m.name: m.compile_s for m in methods if m.compile_s is not None},
                            weight_formats={m.name: m.weight_format for m in methods if m.weight_format},
                            failed_methods=failures)
    notes = report_notes(metadata)
    out = Path(config.out or f"bench-results/{datetime.now():%Y%m%d-%H%M%S}")
    paths = write_report(out, records, summaries, metadata, notes)
    if collab:  # per domain: EM, ES, ms and large-model calls per line

        paths |= write_domain_report(out, domain_table(records, names), folder_diagnostics(specs, target, domains))
    return BenchResult(records, summaries, metadata, notes, paths)


def collab_methods(methods: list[str]) -> list[str]:
    """The collab workload's methods: its own default set in place of the general default."""

    if list(methods) == list(DEFAULT_METHODS):
        return list(DEFAULT_COLLAB_METHODS)
    wrong = [m for m in methods if parse_method(m).kind not in COLLAB_METHODS]
    if wrong:
        raise ConfigError(f"methods {wrong} do not run on the collab workload: use {', '.join(COLLAB_METHODS)}")
    return list(methods)


def _decode_all(
    methods: list[Method], prompts: list[tuple[str, list[int]]], device: torch.device, console: Any, seed: int,
    failures: dict[str, str],
) -> list[Call]:
    torch.manual_seed(seed)
    if console is None:
        return run_interleaved(methods, prompts, device, failures=failures)
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from draftsmith.progress import Bar

    columns = (TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Bar(*columns, console=console) as bar:
        job = bar.add_task("decoding", total=(len(prompts) + 1) * len(methods))
        return run_interleaved(methods, prompts, device,
                               lambda what, done: bar.update(job, description=what, advance=int(done)), failures)


def _status(console: Any, message: str):
    return console.status(message) if console is not None else nullcontext()
