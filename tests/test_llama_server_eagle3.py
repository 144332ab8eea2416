"""llama.cpp runs our EAGLE-3 head: exported, converted by llama.cpp's own converter and served by llama-server
with `--spec-type draft-eagle3`, on a tiny target written as an F32 GGUF with SmolLM2's tokenizer. Its greedy
output equals llama-server's plain greedy output, and both llama.cpp and our engine accept drafts of the same
head. Skipped, with the reason printed, where no llama-server binary is found ($DRAFTSMITH_LLAMA_SERVER or
PATH).

The head is built, not trained (a tiny random target's output cannot be learned in a test's time): the
target's last layer does nothing (o_proj and down_proj zero), so the residual stream entering it is its final
hidden state; fc copies that block of the three, the head's layer adds nothing, and its norm and lm_head are
the target's. So its first draft for a root is the target's own prediction one position back (the root token
itself), accepted wherever the target repeats a token, which the tiny target's loops do. A head the engine
reads otherwise than we mean (layer ids, fc's block order, output rows, d2t) accepts about nothing there, as a
random head does."""

from __future__ import annotations

import pytest
import torch

from draftsmith.bench.config import parse_method
from draftsmith.bench.peers import llama_cpp_converter, llama_server_binary, server_method
from draftsmith.errors import ConfigError
from tiny_models import tiny_llama

VOCAB = 49152  # SmolLM2's tokenizer
LAYERS = [1, 2, 3]
NEW = 32


def _binary() -> str:
    binary, reason = llama_server_binary(), None
    if binary is None:
        reason = "no llama-server binary: set DRAFTSMITH_LLAMA_SERVER or put llama-server on PATH (README: build)"
    else:
        try:
            llama_cpp_converter(binary)
        except ConfigError as e:
            reason = str(e)
    if reason:
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    return binary


def oracle_head(target, folder):
    """An EAGLE-3 head that repeats the target's own last prediction (see the module's docstring)."""
    from draftsmith.heads import Eagle3Head, HeadConfig, save_head

    hidden = target.config.hidden_size
    head = Eagle3Head(HeadConfig.for_target("eagle3", target, feature_layers=LAYERS, target_layers=4, target="tiny"))
    head.init_from_target(target)
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[:, 2 * hidden :] = torch.eye(hidden)
        head.layer.self_attn.o_proj.weight.zero_()
        head.layer.mlp.down_proj.weight.zero_()
    save_head(head, folder)
    return folder


@pytest.mark.real
def test_llama_server_drafts_with_our_eagle3_head_and_keeps_its_greedy_output(tmp_path):
    binary = _binary()
    from draftsmith.drafters.registry import build_drafter
    from draftsmith.engine import GenerationConfig, SpecEngine
    from draftsmith.gguf_export import write_gguf
    from draftsmith.models import embedded_gguf, load_model

    model = tiny_llama(vocab_size=VOCAB, seed=5, hidden_size=64, num_layers=4, init_std=0.1)
    with torch.no_grad():  # the last layer passes its input through
        model.model.layers[-1].self_attn.o_proj.weight.zero_()
        model.model.layers[-1].mlp.down_proj.weight.zero_()
    gguf = write_gguf(model, tmp_path / "tiny.gguf", embedded_gguf("smollm2"), "f32")
    target = load_model(str(gguf))
    head = oracle_head(target.model, tmp_path / "head")

    prompts = [target.tokenizer(text).input_ids for text in ("def add(a, b):\n", "import os\n", "class Stack:\n")]
    methods = [server_method(parse_method(spec), target, NEW, binary, model_gguf=gguf)
               for spec in ("llama-server", f"llama-server:draft-eagle3:{head}")]
    try:
        plain, eagle3 = ([method.generate(ids) for ids in prompts] for method in methods)
    finally:
        for method in methods:
            method.close()
    for ids, reference, drafted in zip(prompts, plain, eagle3):
        assert drafted.tokens == reference.tokens, ids
    theirs = sum(len(out.tokens) - out.target_steps for out in eagle3)  # draft tokens llama.cpp accepted
    from draftsmith.adaptive import CostCurve

    drafter = build_drafter(f"eagle3:{head}", target)
    drafter.costs = CostCurve([1, 64], [1.0, 1.0])  # trees sized by a fixed curve: on a tiny target, timed costs can
    engine = SpecEngine(target.model, drafter)  # find that no tree pays, and then nothing is drafted at all
    ours = sum(engine.generate(ids, GenerationConfig(max_new_tokens=NEW, k=8)).stats.accepted for ids in prompts)
    print(f"accepted draft tokens on {len(prompts)} prompts of {NEW} tokens: llama-server {theirs}, ours {ours}")
    assert theirs > 0 and ours > 0  # ours drafts trees, llama.cpp a chain: the counts differ (13 and 4 here)
