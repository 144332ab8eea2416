"""`make demo`'s job: a short interleaved benchmark on HumanEval prompts with the embedded
model, run by the bench runner. Its defaults are chosen to finish in about 10 minutes on a 2-core CPU."""

from __future__ import annotations

from rich.console import Console

from draftsmith.cli.bench import run_and_show
from draftsmith.bench.config import BenchConfig
from draftsmith.bench.runner import BenchResult

DEMO_PROMPTS = 10
DEMO_MAX_NEW_TOKENS = 128


def demo_methods(k: int, with_bf16: bool, shipped_head: bool = False) -> list[str]:
    """HF greedy and HF prompt lookup (the references), our plain loop, our adaptive n-gram drafter and, where a
    head ships for the target, `generate`'s default (the EAGLE head with prompt lookup grafted on); the same
    again in bf16 where the hardware has fast bf16, each judged against HF in its own dtype."""
    methods = ["hf-greedy", "hf-prompt-lookup:10", "plain", f"ngram:k={k},adaptive=1"]
    methods += ["eagle:lookup=8"] if shipped_head else []
    return methods + [f"{m}@bf16" for m in methods] if with_bf16 else methods


def demo_config(target: str = "smollm2", prompts: int = DEMO_PROMPTS, max_new_tokens: int = DEMO_MAX_NEW_TOKENS,
                k: int = 16, device: str = "cpu", dtype: str = "float32") -> BenchConfig:
    from draftsmith.models import has_fast_bf16, resolve_device

    from draftsmith.artifacts import shipped_head_folder

    with_bf16 = has_fast_bf16(resolve_device(device)) and dtype == "float32"
    return BenchConfig(target=target, workload="humaneval", limit=prompts, max_new_tokens=max_new_tokens,
                       methods=demo_methods(k, with_bf16, shipped_head_folder(target, "eagle").is_dir()),
                       device=device, dtype=dtype, pass_at_1=True)


def run_demo(console: Console | None = None, **options) -> BenchResult:
    return run_and_show(demo_config(**options), console)
