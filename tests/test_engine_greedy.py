"""Greedy speculative decoding must reproduce the target's own greedy output token for token (fp32)."""

import pytest
import torch

from draftsmith.backends.protocol import BackendConfig
from draftsmith.drafters.model import ModelDrafter
from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from scripted_drafters import OracleDrafter, TreeOracleDrafter
from tiny_models import char_tokenizer, hf_greedy, noisy_copy, tiny_gemma3, tiny_llama

PROMPTS = ["def add(a, b):\n    return a + b\n\ndef add(", "for i in range(10):\n    print(i)\n", "x", "abcabcabcabc"]
NEW = 40


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module", params=[1, 7])
def target(request):
    return tiny_llama(seed=request.param)


def drafters(target):
    return {
        "ngram": lambda: NgramDrafter(min_n=1, max_n=3),
        "model-unrelated": lambda: ModelDrafter(tiny_llama(seed=99)),
        "model-noisy-self": lambda: ModelDrafter(noisy_copy(target, scale=0.3)),
    }


@pytest.mark.parametrize("lean", [True, False], ids=["lean-backend", "hf-backend"])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("drafter_name", ["ngram", "model-unrelated", "model-noisy-self"])
def test_greedy_matches_hf_generate(target, tok, drafter_name, k, lean):
    engine = SpecEngine(target, drafters(target)[drafter_name](), tok, backend=BackendConfig(lean=lean))
    accepted_any = False
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        result = engine.generate(ids, GenerationConfig(max_new_tokens=NEW, k=k))
        assert result.tokens == hf_greedy(target, ids, NEW), (drafter_name, k, prompt)
        accepted_any |= result.stats.accepted > 0
    if drafter_name == "model-noisy-self":  # this drafter must really exercise partial acceptance
        assert accepted_any


def test_plain_decoding_is_k0(target, tok):
    ids = tok(PROMPTS[0]).input_ids
    result = SpecEngine(target, None, tok).generate(ids, GenerationConfig(max_new_tokens=NEW, k=8))
    assert result.tokens == hf_greedy(target, ids, NEW)
    assert result.stats.target_steps == NEW and result.stats.tau == 1.0 and result.stats.proposed == 0


@pytest.mark.parametrize("wrong_at", [set(), {0}, {2}, {0, 1, 2, 3, 4, 5, 6, 7}])
def test_rollback_after_full_partial_and_no_acceptance(target, tok, wrong_at):
    ids = tok(PROMPTS[1]).input_ids
    reference = hf_greedy(target, ids, NEW)
    drafter = OracleDrafter(reference, len(ids), wrong_at=wrong_at, vocab=target.config.vocab_size)
    result = SpecEngine(target, drafter, tok).generate(ids, GenerationConfig(max_new_tokens=NEW, k=8))
    assert result.tokens == reference
    steps = result.stats.target_steps
    if not wrong_at:  # every draft accepted: 9 tokens a step, the last step capped by the end
        assert steps == -(-len(reference) // 9) and result.stats.acceptance_rate == 1.0
    if wrong_at == {0}:  # nothing ever accepted: plain decoding speed, still exact
        assert steps == len(reference) and result.stats.accepted == 0
    if wrong_at == {2}:
        assert result.stats.tau == pytest.approx(3.0, abs=0.5)


@pytest.mark.parametrize("k", [1, 4])
def test_fully_accepted_drafts_are_exact_and_take_k_plus_1_tokens_a_step(target, tok, k):
    """The target drafting for itself: every draft accepted, each step ends with the bonus token."""
    ids = tok(PROMPTS[0]).input_ids
    result = SpecEngine(target, ModelDrafter(target), tok).generate(ids, GenerationConfig(max_new_tokens=NEW, k=k))
    assert result.tokens == hf_greedy(target, ids, NEW)
    assert result.stats.acceptance_rate == 1.0
    assert result.stats.target_steps == -(-NEW // (k + 1))


@pytest.mark.parametrize("wrong_at", [set(), {0}])
def test_k1_with_every_draft_accepted_or_none(target, tok, wrong_at):
    ids = tok(PROMPTS[3]).input_ids
    reference = hf_greedy(target, ids, NEW)
    drafter = OracleDrafter(reference, len(ids), wrong_at=wrong_at, vocab=target.config.vocab_size)
    result = SpecEngine(target, drafter, tok).generate(ids, GenerationConfig(max_new_tokens=NEW, k=1))
    assert result.tokens == reference
    assert result.stats.accepted == (0 if wrong_at else result.stats.proposed)
    assert result.stats.target_steps == (NEW if wrong_at else NEW // 2)


def test_eos_inside_a_drafted_block(tok):
    target = tiny_llama(seed=3)
    ids = tok(PROMPTS[0]).input_ids
    free_run = hf_greedy(target, ids, NEW)
    eos = free_run[5]  # make a token the model emits early into EOS, so it falls inside a k=8 block
    target.generation_config.eos_token_id = eos
    reference = hf_greedy(target, ids, NEW)
    assert reference[-1] == eos and len(reference) < 9
    for drafter in (ModelDrafter(target), OracleDrafter(reference, len(ids), vocab=target.config.vocab_size)):
        result = SpecEngine(target, drafter, tok).generate(ids, GenerationConfig(max_new_tokens=NEW, k=8))
        assert result.tokens == reference and result.finish_reason == "eos"


@pytest.mark.parametrize("max_new", [1, 2, 5, 10, 17])
def test_max_new_tokens_inside_a_block_never_overshoots(target, tok, max_new):
    ids = tok(PROMPTS[2]).input_ids
    reference = hf_greedy(target, ids, max_new)
    result = SpecEngine(target, ModelDrafter(target), tok).generate(ids, GenerationConfig(max_new_tokens=max_new, k=8))
    assert result.tokens == reference and len(result.tokens) == max_new and result.finish_reason == "length"


@pytest.mark.parametrize("lean", [True, False], ids=["lean-backend", "hf-backend"])
def test_tree_draft_verification_keeps_only_the_accepted_path(target, tok, lean):
    """Wrong siblings come first, so the accepted path's cache entries must be moved into place."""
    ids = tok(PROMPTS[0]).input_ids
    reference = hf_greedy(target, ids, NEW)
    drafter = TreeOracleDrafter(reference, len(ids), vocab=target.config.vocab_size)
    engine = SpecEngine(target, drafter, tok, backend=BackendConfig(lean=lean))
    result = engine.generate(ids, GenerationConfig(max_new_tokens=NEW, k=8))
    assert result.tokens == reference
    assert result.stats.tau >= 4  # 4 levels accepted per step plus the bonus token (fewer near the end)


def test_streaming_callback_and_stop_strings(tok):
    target = tiny_llama(seed=1)
    ids = tok("for i in range(3):").input_ids
    full = tok.decode(hf_greedy(target, ids, NEW))
    stop = full[10:12]  # a stop string the model will produce
    pieces: list[str] = []
    engine = SpecEngine(target, NgramDrafter(), tok)
    result = engine.generate(ids, GenerationConfig(max_new_tokens=NEW, k=3, stop=[stop]), on_text=pieces.append)
    cut = full.index(stop)
    assert result.finish_reason == "stop"
    assert result.text == full[:cut] == "".join(pieces)
    assert tok.decode(result.tokens) == full[: cut + len(stop)]  # tokens end at the one completing the stop


def test_streamed_text_equals_final_text_without_stops(target, tok):
    pieces: list[str] = []
    result = SpecEngine(target, NgramDrafter(), tok).generate_text(
        PROMPTS[0], GenerationConfig(max_new_tokens=NEW, k=4), on_text=pieces.append
    )
    assert "".join(pieces) == result.text == tok.decode(result.tokens, skip_special_tokens=True)
    assert len(pieces) > 1


def test_lean_backend_serves_llama_family_and_falls_back_otherwise(target):
    from draftsmith.backends.factory import cached_lm
    from draftsmith.backends.hf import HFCachedLM
    from draftsmith.backends.lean import LeanLlama

    assert isinstance(cached_lm(target), LeanLlama)
    assert isinstance(cached_lm(tiny_gemma3()), HFCachedLM)  # sliding windows, q/k norms: transformers' forward


def llama_family_model(family: str, seed: int = 3):
    """Tiny random models of each architecture the lean backend claims, with their biases where they have them."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    sizes = dict(vocab_size=102, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, eos_token_id=1, pad_token_id=0,
                 bos_token_id=None, tie_word_embeddings=False, initializer_range=0.5)
    torch.manual_seed(seed)
    model = {
        "llama-attention-bias": lambda: LlamaForCausalLM(LlamaConfig(attention_bias=True, **sizes)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**sizes)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(sliding_window=None, **sizes)),
    }[family]().eval()
    with torch.no_grad():  # random, not zero, biases: a dropped bias must change the output
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 1, 0
    return model


@pytest.mark.parametrize("family", ["llama-attention-bias", "qwen2", "mistral"])
def test_lean_backend_is_exact_on_every_family_it_claims(tok, family):
    from draftsmith.backends.factory import cached_lm
    from draftsmith.backends.lean import LeanLlama

    model = llama_family_model(family)
    assert isinstance(cached_lm(model), LeanLlama)
    engine = SpecEngine(model, NgramDrafter(min_n=1, max_n=3), tok)
    for prompt in PROMPTS[:2]:
        ids = tok.encode(prompt)
        result = engine.generate(ids, GenerationConfig(max_new_tokens=NEW, k=3))
        assert result.tokens == hf_greedy(model, ids, NEW)


def test_ngram_drafter_copies_the_continuation_of_the_first_occurrence():
    drafter = NgramDrafter(min_n=1, max_n=3)
    context = [5, 6, 7, 8, 1, 5, 6, 9, 2, 5, 6]
    assert drafter.propose(context, 3).tokens == [7, 8, 1]  # "5 6" first seen before "7 8 1"
    context += [9, 2]
    assert drafter.propose(context, 2).tokens == [5, 6]  # the longest match, "6 9 2", was indexed incrementally
    context += [4]
    assert drafter.propose(context, 2).tokens == []  # "4" never occurred before
    assert drafter.propose([1, 2, 3], 4).tokens == []  # shorter context: a new request, nothing repeats


def test_raw_prompts_get_the_tokenizers_special_tokens_and_templated_ones_keep_theirs():
    from tokenizers.processors import TemplateProcessing

    from draftsmith.models import encode_prompt

    bos_tok = char_tokenizer()
    bos_tok.backend_tokenizer.post_processor = TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 1)])
    plain = char_tokenizer()("ab").input_ids
    assert encode_prompt(bos_tok, "ab") == [1] + plain  # what HF generate users feed (Gemma needs its BOS)
    assert encode_prompt(bos_tok, "<eos>ab", templated=True) == [1] + plain  # the template wrote it: not twice


@pytest.mark.parametrize("attention", [torch.bfloat16, torch.float32])
def test_lean_fused_path_below_float32_is_as_accurate_as_transformers(monkeypatch, attention):
    """Below fp32 the lean forward fuses its RMSNorm and rotates queries and keys together with the sign folded
    into sin. Over a prefill, a chunk and cached steps its logits must stay as close to the fp32 computation on
    the same weights as transformers' own bf16 forward does (both round; a wrong rotation would not be close).
    Where float32 attention is faster (a CPU without bf16 arithmetic) the cache holds float32 and attention
    runs in float32."""
    import copy

    from draftsmith.backends import layers
    from draftsmith.backends.lean import LeanLlama

    monkeypatch.setattr(layers, "attention_dtype", lambda dtype, *shape: attention)
    model = tiny_llama(seed=5, hidden_size=64).to(torch.bfloat16)
    ids = torch.randint(2, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    lm = LeanLlama(model, weights="stored")
    assert not lm.exact and lm.cache_dtype == attention
    logits = torch.cat([lm.forward(ids[0, :16].tolist()), lm.forward(ids[0, 16:20].tolist()),
                        *(lm.forward([t]) for t in ids[0, 20:].tolist())])
    with torch.no_grad():
        truth = copy.deepcopy(model).float()(ids).logits[0]
        transformers_bf16 = model(ids).logits[0].float()
    ours, theirs = (logits - truth).abs(), (transformers_bf16 - truth).abs()
    assert ours.mean() < 1.5 * theirs.mean() and ours.max() < 1.5 * theirs.max()
    assert (logits.argmax(-1) == truth.argmax(-1)).float().mean() >= 0.9
