"""Captured drafting on a tiny random model on CUDA, against eager drafting and plain decoding: a quick check
before a long GPU run (run with CUDA_LAUNCH_BLOCKING=1 to see a failing operation's own traceback)."""

import sys
import traceback

import torch

sys.path.insert(0, "tests")
from tiny_models import tiny_llama  # noqa: E402

from draftsmith.drafters.eagle import EagleDrafter, TreeConfig  # noqa: E402
from draftsmith.engine import GenerationConfig, SpecEngine  # noqa: E402
from draftsmith.heads import EagleHead, HeadConfig  # noqa: E402

for dtype in (torch.float32, torch.bfloat16):
    for depth, top_k, vocab in ((4, 3, 0), (6, 8, 0), (6, 8, 40)):
        model = tiny_llama(seed=4).to("cuda", dtype)
        torch.manual_seed(0)
        head = EagleHead(HeadConfig.for_target("eagle", model, draft_vocab=vocab)).eval()
        if vocab:
            head.draft_to_target.copy_(torch.randperm(model.config.vocab_size)[:vocab].sort().values)
        head = head.to("cuda", dtype)
        try:
            drafter = EagleDrafter(head, model, TreeConfig(depth=depth, top_k=top_k), graphs=True)
            engine, plain = SpecEngine(model, drafter), SpecEngine(model)
            prompt = [5, 17, 33, 8, 21, 40, 9, 5, 17, 33] * 3
            config = GenerationConfig(max_new_tokens=60, k=24)
            a, b = engine.generate(prompt, config), plain.generate(prompt, config)
            print(dtype, depth, top_k, vocab, "exact" if a.tokens == b.tokens else "DIFFERS", f"tau {a.stats.tau:.2f}",
                  "captures", drafter.captured.graphs.captures, "failed", drafter.captured.graphs.failed, flush=True)
        except Exception:
            traceback.print_exc()
            sys.exit(1)
