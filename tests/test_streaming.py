"""TextStream: incremental detokenization whose streamed pieces add up to the whole decode, and stop strings
found wherever they fall, on a byte-level BPE tokenizer that splits characters across tokens."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from draftsmith.streaming import TextStream

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "print('héllo wörld') # café, naïve, señor\n",
    "数据 = {'键': '值'}  # 中文注释\n",
    "emoji = '🙂🚀✨' if ok else '❌'\n",
    "for i in range(10):\n    total += i * 2\n",
]


@pytest.fixture(scope="module")
def byte_tok() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in code: rare characters (emoji, CJK) stay split into their UTF-8 bytes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def metaspace_tok() -> PreTrainedTokenizerFast:
    """SentencePiece-style: spaces become '▁' on the following token, and a decode drops its leading one."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=200, special_tokens=["<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def chunks(ids: list[int], rng: random.Random, largest: int = 5) -> list[list[int]]:
    """Split ids into steps of 1..largest tokens, as accepted drafts arrive."""
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, largest)
        out.append(ids[i:i + n])
        i += n
    return out


def test_byte_tokenizer_splits_characters(byte_tok):
    ids = byte_tok("🙂").input_ids
    assert len(ids) > 1 and all("\ufffd" in decode(byte_tok, [t]) for t in ids)  # one emoji, several tokens


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["byte_tok", "metaspace_tok"])
def test_pieces_add_up_to_the_whole_decode(request, kind, seed):
    tok = request.getfixturevalue(kind)
    rng = random.Random(seed)
    text = "".join(rng.choice(CORPUS) for _ in range(4))
    ids = tok(text).input_ids + [tok.eos_token_id]
    pieces: list[str] = []
    stream = TextStream(tok, on_text=pieces.append)
    for step in chunks(ids, rng):
        assert stream.push(step) is None
        assert "\ufffd" not in "".join(pieces)  # half a character is never emitted
    assert stream.finish() == "".join(pieces) == decode(tok, ids)
    assert len(pieces) > 1


@pytest.mark.parametrize("seed", range(4))
def test_random_ids_match_the_whole_decode(byte_tok, seed):
    """Any ids, even bytes that never form a character: the stream still adds up to decode(all ids)."""
    rng = random.Random(seed)
    ids = [rng.randrange(len(byte_tok)) for _ in range(300)]
    pieces: list[str] = []
    stream = TextStream(byte_tok, on_text=pieces.append)
    for step in chunks(ids, rng):
        stream.push(step)
    assert stream.finish() == "".join(pieces) == decode(byte_tok, ids)


def first_stop(tok, ids: list[int], stops: list[str]) -> tuple[int, str] | None:
    """The reference: decode every prefix of ids; the first that shows a stop string, and the text before it."""
    for m in range(1, len(ids) + 1):
        text = decode(tok, ids[:m]).rstrip("\ufffd")
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        if found:
            return m, text[:min(found)]
    return None


@pytest.mark.parametrize("seed", range(8))
def test_stop_strings_across_step_boundaries(byte_tok, seed):
    rng = random.Random(seed)
    text = "".join(rng.choice(CORPUS) for _ in range(4))
    ids = byte_tok(text).input_ids
    start = rng.randrange(20, len(text) - 8)
    stops = [text[start:start + rng.randint(2, 6)], "never appears"]  # may hold emoji or CJK characters
    expected_tokens, expected_text = first_stop(byte_tok, ids, stops)
    pieces: list[str] = []
    stream = TextStream(byte_tok, stops, on_text=pieces.append)
    used = 0
    for step in chunks(ids, rng):
        kept = stream.push(step)
        if kept is not None:
            used += kept
            break
        used += len(step)
    else:
        pytest.fail("the stop string was not found")
    assert used == expected_tokens  # the step is cut at the token completing the stop string
    assert stream.finish() == "".join(pieces) == expected_text
    assert all(stop not in expected_text for stop in stops)


def test_a_stop_prefix_is_held_back_then_released(byte_tok):
    pieces: list[str] = []
    stream = TextStream(byte_tok, ["return 0"], on_text=pieces.append)
    ids = byte_tok("x = 1\nreturn a").input_ids
    split = len(byte_tok("x = 1\nretu").input_ids)
    assert stream.push(ids[:split]) is None
    assert "".join(pieces) == "x = 1\n"  # "retu" could still become "return 0"
    assert stream.push(ids[split:]) is None
    assert stream.finish() == "".join(pieces) == "x = 1\nreturn a"


def counting(tok):
    """The tokenizer, counting the ids it decodes."""

    class Counting:
        decoded = 0

        def __getattr__(self, name):
            return getattr(tok, name)

        def decode(self, ids, **kwargs):
            Counting.decoded += len(ids)
            return tok.decode(ids, **kwargs)

    return Counting()


def test_decoding_work_is_linear_in_the_output(byte_tok):
    """Each step decodes a window of recent ids, not the whole output: the ids decoded in total grow
    linearly with the output (the old stream decoded all of it every step, about n**2 / 2)."""
    ids = byte_tok("".join(CORPUS) * 20).input_ids
    tok = counting(byte_tok)
    stream = TextStream(tok, ["never appears"])
    for step in chunks(ids, random.Random(0), largest=4):
        stream.push(step)
    assert stream.finish() == decode(byte_tok, ids)
    assert tok.decoded < 12 * len(ids), (tok.decoded, len(ids))


def test_invalid_bytes_do_not_grow_the_window(byte_tok):
    """A model that emits bytes that never form a character: every step's text ends in U+FFFD, yet the
    window moves on, and the text still equals the whole decode."""
    lone = next(i for i in range(len(byte_tok)) if decode(byte_tok, [i]) == "\ufffd")
    ids = [lone] * 2000
    tok = counting(byte_tok)
    pieces: list[str] = []
    stream = TextStream(tok, on_text=pieces.append)
    for step in chunks(ids, random.Random(1), largest=3):
        stream.push(step)
    assert stream.finish() == "".join(pieces) == decode(byte_tok, ids)
    assert tok.decoded < 40 * len(ids), (tok.decoded, len(ids))
