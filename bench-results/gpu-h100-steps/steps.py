"""GPU scratch check: lean forward steps eager vs CUDA graphs on a random SmolLM2-shaped model (same shapes as the
embedded target), and HF's own one-token step, all timed side by side; logits compared."""
import json
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from draftsmith.cached_lm import LeanLlama
from draftsmith.cuda_graphs import CapturedSteps, run_eagerly

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of this script, graphs replayed eagerly
sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30 if DEV == "cuda" else 2,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                  tie_word_embeddings=True, rms_norm_eps=1e-5)
CTX = 300


def step_ms(lm, sizes, iters=60):
    lm.reset()
    lm.forward(list(range(5, 5 + CTX)), last_only=True)
    out = {}
    for n in sizes:
        ids = list(range(1, n + 1))
        for _ in range(3):
            lm.forward(ids).argmax(-1).tolist()
            lm.truncate(CTX)
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            lm.forward(ids).argmax(-1).tolist()  # the engine reads every step's choice: a sync per step
            lm.truncate(CTX)
        out[n] = round((time.perf_counter() - start) / iters * 1e3, 3)
    return out


def compare(dtype):
    model = LlamaForCausalLM(cfg).to(DEV, dtype).eval()
    eager, graphed = LeanLlama(model, graphs=False), LeanLlama(model, graphs=DEV == "cuda")
    if DEV == "cpu":
        graphed.graphs = CapturedSteps(graphed, capture=run_eagerly)
    res = {"dtype": str(dtype)}
    for lm in (eager, graphed):
        lm.reset()
        lm.forward(list(range(5, 5 + CTX)), last_only=True)
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool, device=DEV)
    diffs = []
    for ids, pos, mask in (([7], None, None), ([5, 6, 7], None, None), ([9, 4, 4, 8], [CTX + 3, CTX + 4, CTX + 4, CTX + 5], tree),
                           (list(range(30)), None, None)):
        a = eager.forward(ids, positions=pos, tree_mask=mask, features=True)
        b = graphed.forward(ids, positions=pos, tree_mask=mask, features=True)
        diffs.append({"n": len(ids), "max_abs_logit_diff": float((a[0] - b[0]).abs().max()),
                      "argmax_equal": float((a[0].argmax(-1) == b[0].argmax(-1)).float().mean()),
                      "max_abs_feature_diff": float((a[1].float() - b[1].float()).abs().max())})
    res["diffs"], res["captures"], res["failed"] = diffs, graphed.graphs.captures, graphed.graphs.failed
    sizes = (1, 2, 4, 8, 16, 32, 64)
    res["eager_ms"] = step_ms(eager, sizes)
    res["graphs_ms"] = step_ms(graphed, sizes)
    res["eager_ms_again"] = step_ms(eager, (1, 8))
    # HF's own one-token step (dynamic cache) at the same context
    with torch.no_grad():
        cache = DynamicCache()
        model(torch.arange(5, 5 + CTX, device=DEV)[None], past_key_values=cache)
        tok = torch.tensor([[7]], device=DEV)
        for _ in range(3):
            out = model(tok, past_key_values=cache)
            out.logits[0, -1].argmax().item()
        sync()
        start = time.perf_counter()
        for _ in range(60):
            out = model(tok, past_key_values=cache)
            out.logits[0, -1].argmax().item()
        res["hf_one_token_ms"] = round((time.perf_counter() - start) / 60 * 1e3, 3)
    print(json.dumps(res), flush=True)
    return res


results = [compare(torch.bfloat16), compare(torch.float32)]
print(json.dumps({"gpu": torch.cuda.get_device_name() if DEV == "cuda" else DEV, "torch": torch.__version__,
                  "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else 0}))
