"""Where a feature-head step's time goes on a GPU: the head's drafting alone (captured and eager, each timed
with the device synchronised), and a host profile of whole requests. Run on the device machine after a bench:
python scripts/gpu_profile_drafting.py TARGET HEAD_DIR [PROMPTS]."""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

import torch

from draftsmith.bench.workloads import load_tasks
from draftsmith.drafters import build_drafter
from draftsmith.drafters.merged import TreeWithLookup
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.models import encode_prompt, load_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(target: str, head: str, prompts: int = 4, device: str = "cuda") -> None:
    loaded = load_model(target, device=device, dtype="bfloat16")
    tasks = load_tasks("humaneval", prompts)
    config = GenerationConfig(max_new_tokens=128, k=32)
    captured = loaded.model.device.type == "cuda"
    for spec, graphs in (("eagle", captured), ("eagle", False), ("eagle+ngram", captured)):
        drafter = build_drafter(f"{spec}:{head}", loaded, graphs=graphs)
        engine = SpecEngine(loaded.model, drafter)
        ids = [encode_prompt(loaded.tokenizer, task.prompt, False) for task in tasks]
        engine.generate(ids[0], config)  # warm-up: captures, calibration
        head_drafter = drafter.tree if isinstance(drafter, TreeWithLookup) else drafter
        context = ids[1]
        engine.generate(context, config)
        sync(loaded.model.device)
        start, rounds = time.perf_counter(), 50
        for _ in range(rounds):  # the tree of the request's last step, drafted again and again
            head_drafter.layers.truncate(head_drafter.length)  # as the step's feedback would
            drafter.propose(context, 32)
        sync(loaded.model.device)
        print(f"{spec} graphs={graphs}: propose {1000 * (time.perf_counter() - start) / rounds:.2f} ms a tree")
        profile = cProfile.Profile()
        profile.enable()
        stats = [engine.generate(i, config).stats for i in ids[1:]]
        profile.disable()
        steps = sum(s.target_steps for s in stats)
        tokens = sum(s.new_tokens for s in stats)
        print(f"  {tokens / sum(s.total_s for s in stats):.0f} tok/s, tau {tokens / steps:.2f}, draft "
              f"{1000 * sum(s.draft_s for s in stats) / steps:.2f} ms/step, verify "
              f"{1000 * sum(s.verify_s for s in stats) / steps:.2f} ms/step")
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(14)
        print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) if a.isdigit() else a for a in sys.argv[3:]))
