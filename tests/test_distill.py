"""Distilled student: loss, padding, resume, saved folder, and settings checks, on tiny CPU models."""

from __future__ import annotations

import copy
import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from draftsmith.data.corpus import load_corpus
from draftsmith.drafters.registry import build_drafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.models import LoadedModel
from draftsmith.errors import ConfigError
from draftsmith.cli.main import app
from draftsmith.data.onpolicy import OnPolicyConfig, OnPolicyData, build_onpolicy_shards, function_prompts
from draftsmith.train.distill import (DistillConfig, DistillLoss, StudentConfig, TokenChunks, build_student,
                                      distill, distill_loss, principal_basis, topk_distill_loss)
from draftsmith.train.trainer import Trainer, TrainConfig, list_checkpoints
from tiny_models import char_tokenizer, hf_greedy, tiny_llama

TINY_STUDENT = StudentConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # models this small run ~1000x faster on one thread than with OpenMP threads fighting over shared cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(24):
        body = "\n".join(f"    x{j} = x{j - 1} + {i * j % 7}" for j in range(1, 12))
        (root / f"mod_{i}.py").write_text(f"def f{i}(x0):\n{body}\n    return x11\n")
    return root


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(seed=0, init_std=0.5).requires_grad_(False)


def chunks(corpus, max_chunks=None):
    return TokenChunks(load_corpus(corpus, split="train", heldout_percent=25), char_tokenizer(), 32, max_chunks)


def losses(loss_fn: DistillLoss, student, batch) -> torch.Tensor:
    """(total, ce, kl) of one batch."""
    total, metrics = loss_fn(student, batch)
    return torch.stack([total, metrics["ce"], metrics["kl"]])


def train_config(out_dir, **overrides) -> TrainConfig:
    settings = dict(out_dir=out_dir, max_steps=30, batch_size=4, lr=1e-2, warmup_steps=3, log_every=10,
                    eval_every=0, checkpoint_every=0, progress=False, device="cpu")
    return TrainConfig(**{**settings, **overrides})


def test_training_reduces_loss(corpus, teacher, tmp_path):
    data = chunks(corpus)
    trainer = Trainer(train_config(tmp_path))
    student = build_student(teacher, TINY_STUDENT)
    loss_fn = DistillLoss(teacher, alpha=0.5, temperature=1.0)
    everything = {"input_ids": data.input_ids, "attention_mask": data.attention_mask}
    with torch.no_grad():
        before, _ = loss_fn(student.eval(), everything)
    result = trainer.fit(student, data, loss_fn)
    with torch.no_grad():
        after, _ = loss_fn(student.eval(), everything)
    assert result.step == 30
    assert after < 0.8 * before, (float(before), float(after))
    assert set(result.metrics) >= {"loss", "ce", "kl", "ppl", "lr"}


def test_kl_is_zero_when_student_equals_teacher(corpus, teacher):
    batch = chunks(corpus)[0:4]
    for temperature in (1.0, 2.0):
        total, ce, kl = losses(DistillLoss(teacher, alpha=0.3, temperature=temperature), copy.deepcopy(teacher), batch)
        assert abs(float(kl)) < 1e-6
        assert torch.isclose(total, 0.3 * ce, atol=1e-5)
    _, _, kl_other = losses(DistillLoss(teacher, alpha=0.3, temperature=1.0), tiny_llama(seed=1, init_std=0.5), batch)
    assert kl_other > 0.1  # the check above is not vacuous


def test_padding_does_not_affect_loss(teacher):
    student = tiny_llama(seed=2, hidden_size=16, num_layers=1, init_std=0.5)
    loss_fn = DistillLoss(teacher, alpha=0.5, temperature=2.0)
    torch.manual_seed(0)
    a, b = torch.randint(2, 102, (20,)), torch.randint(2, 102, (9,))

    def padded(rows: list[torch.Tensor], length: int, pad: int) -> dict[str, torch.Tensor]:
        ids = torch.full((len(rows), length), pad)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = row, 1
        return {"input_ids": ids, "attention_mask": mask}

    alone = [losses(loss_fn, student, padded([r], len(r), 0)) for r in (a, b)]
    # the pad id and the amount of padding change nothing
    for length, pad in ((20, 0), (32, 57), (40, 1)):
        together = losses(loss_fn, student, padded([a, b], length, pad))
        # averaged over real tokens: a batch is the token-weighted mean of its sequences (19 and 8 targets)
        assert torch.allclose(together, (19 * alone[0] + 8 * alone[1]) / 27, atol=1e-5)

    # the loss function itself ignores whatever logits and labels sit at masked positions
    s, t = torch.randn(2, 6, 10), torch.randn(2, 6, 10)
    labels, mask = torch.randint(0, 10, (2, 6)), torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    reference = torch.stack(distill_loss(s, t, labels, mask, 0.5, 2.0))
    s2, t2, labels2 = s.clone(), t.clone(), labels.clone()
    s2[mask == 0], t2[mask == 0], labels2[mask == 0] = 1e4, -1e4, 3
    assert torch.allclose(torch.stack(distill_loss(s2, t2, labels2, mask, 0.5, 2.0)), reference)


class PowerCut(Exception):
    pass


def resumable_run(teacher, data, out_dir, resume=False, at_call=None, interrupt=PowerCut):
    """A tiny distillation whose loss function, at its `at_call`-th call, raises PowerCut or sends this
    process a SIGINT (as Ctrl-C does)."""
    # dropout makes the result depend on the RNG state, not only on weights and data
    spec = StudentConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, attention_dropout=0.2)
    loss_fn = DistillLoss(teacher, alpha=0.5, temperature=1.0)
    trainer = Trainer(train_config(out_dir, resume=resume, max_steps=8, batch_size=2, grad_accum=2,
                                   checkpoint_every=3, warmup_steps=2))
    student = build_student(teacher, spec)
    calls = 0

    def maybe_interrupt(model, batch):
        nonlocal calls
        calls += 1
        if calls == at_call:
            if interrupt is PowerCut:
                raise PowerCut
            os.kill(os.getpid(), signal.SIGINT)
        return loss_fn(model, batch)

    trainer.fit(student, data, maybe_interrupt)
    return student


@pytest.mark.parametrize("interrupt, checkpoints", [(PowerCut, ["step-0000003"]),
                                                    (KeyboardInterrupt, ["step-0000003", "step-0000005"])])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(corpus, teacher, tmp_path, interrupt, checkpoints):
    # a power cut loses the step it was in; Ctrl-C (SIGINT) checkpoints it first
    if interrupt is KeyboardInterrupt and threading.current_thread() is not threading.main_thread():
        pytest.skip("only the main thread takes signals")
    data = chunks(corpus, max_chunks=10)  # 5 batches an epoch: the run crosses epochs
    reference = resumable_run(teacher, data, tmp_path / "straight").state_dict()
    with pytest.raises(interrupt):
        resumable_run(teacher, data, tmp_path / "cut", at_call=2 * 4 + 2, interrupt=interrupt)  # in step 5
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == checkpoints
    resumed = resumable_run(teacher, data, tmp_path / "cut", resume=True).state_dict()
    for name, weight in reference.items():
        assert torch.equal(weight, resumed[name]), name


class Exploit:  # what an unsafe unpickler would run
    def __reduce__(self):
        return (os.system, ("touch /tmp/draftsmith-unpickled",))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "truncated weights": lambda c: _truncate(c / "trainable.safetensors"),
    "garbage weights": lambda c: (c / "trainable.safetensors").write_bytes(os.urandom(300)),
    "truncated optimizer": lambda c: _truncate(c / "optimizer.pt"),
    "pickled code in the optimizer": lambda c: torch.save({"state": Exploit()}, c / "optimizer.pt"),
    "empty scheduler": lambda c: (c / "scheduler.pt").write_bytes(b""),
    "empty rng": lambda c: (c / "rng-0.pt").write_bytes(b""),
    "rng of another kind": lambda c: torch.save({"seed": torch.zeros(2)}, c / "rng-0.pt"),
    "garbage state": lambda c: (c / "state.json").write_text("{not json"),
    "missing state": lambda c: (c / "state.json").unlink(),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_damaged_checkpoint_is_named_and_the_previous_one_resumed(corpus, teacher, tmp_path, corruption, capsys):
    data = chunks(corpus, max_chunks=10)
    reference = resumable_run(teacher, data, tmp_path / "straight").state_dict()
    with pytest.raises(PowerCut):
        resumable_run(teacher, data, tmp_path / "cut", at_call=7 * 2 + 1)  # in step 8: checkpoints 3 and 6
    latest = list_checkpoints(tmp_path / "cut" / "checkpoints")[-1]
    assert latest.name == "step-0000006"
    CORRUPTIONS[corruption](latest)
    resumed = resumable_run(teacher, data, tmp_path / "cut", resume=True).state_dict()
    out = capsys.readouterr().out
    assert "step-0000006" in out and "resuming from the previous intact one, step-0000003" in out, out
    assert not Path("/tmp/draftsmith-unpickled").exists()
    for name, weight in reference.items():
        assert torch.equal(weight, resumed[name]), name


def test_no_intact_checkpoint_is_a_clear_error(corpus, teacher, tmp_path):
    data = chunks(corpus, max_chunks=10)
    with pytest.raises(PowerCut):
        resumable_run(teacher, data, tmp_path, at_call=4 * 2 + 1)  # in step 5: checkpoint 3 only
    (list_checkpoints(tmp_path / "checkpoints")[-1] / "rng-0.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no intact checkpoint .*step-0000003 \(EOFError"):
        resumable_run(teacher, data, tmp_path, resume=True)


def test_saved_student_loads_with_from_pretrained(corpus, teacher, tmp_path):
    out = tmp_path / "student"
    config = DistillConfig(data="corpus", corpus=corpus, heldout_percent=25, seq_len=32, eval_chunks=4,
                           student=TINY_STUDENT, save_dtype="float32")
    result = distill(teacher, char_tokenizer(), config, train_config(out, max_steps=4))
    assert 0 <= result.eval["greedy_match"] <= 1

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert (out / "model.safetensors").is_file()
    assert loaded.config.vocab_size == teacher.config.vocab_size
    assert loaded.config.num_hidden_layers == 1 and loaded.config.hidden_size == 16
    assert AutoTokenizer.from_pretrained(out).get_vocab() == char_tokenizer().get_vocab()
    # the saved weights are the trained ones (those of the final checkpoint)
    final = load_file(list_checkpoints(out / "checkpoints")[-1] / "trainable.safetensors")
    for name, weight in final.items():
        assert torch.equal(loaded.state_dict()[name], weight), name
    logits = loaded(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, teacher.config.vocab_size)
    summary = json.loads((out / "distill.json").read_text())
    assert 0 <= summary["heldout_untrained"]["greedy_match"] <= 1  # the untrained score, to compare with

    # the student is a drafter as `--drafter model:DIR` builds it, and decoding with it stays exact
    target = LoadedModel(model=teacher, tokenizer=char_tokenizer(), name="teacher")
    drafter = build_drafter(f"model:{out}", target)
    for prompt in ("def f3(x0):\n    x1 = x0", "    return x"):
        ids = char_tokenizer()(prompt).input_ids
        for k in (1, 3, 8):
            result = SpecEngine(teacher, drafter).generate(ids, GenerationConfig(max_new_tokens=30, k=k))
            assert result.tokens == hf_greedy(teacher, ids, 30)

    # resuming the finished run says so and changes nothing (it used to rewrite distill.json, evaluation empty)
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    with pytest.raises(ConfigError, match="already finished: its latest checkpoint, step-0000004"):
        distill(teacher, char_tokenizer(), config, train_config(out, max_steps=4, resume=True))
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before


def test_a_resume_with_other_task_settings_is_refused_and_changes_nothing(corpus, teacher, tmp_path):
    """The checkpoint records the recipe's own settings: continuing it with another loss weight (or data, or
    shape) would train another run under the first one's name."""
    out = tmp_path / "student"
    config = DistillConfig(data="corpus", corpus=corpus, heldout_percent=25, seq_len=32, eval_chunks=4,
                           student=TINY_STUDENT, save_dtype="float32")
    distill(teacher, char_tokenizer(), config, train_config(out, max_steps=2))
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    other = DistillConfig(data="corpus", corpus=corpus, heldout_percent=25, seq_len=32, eval_chunks=4,
                          student=TINY_STUDENT, save_dtype="float32", alpha=0.7)
    refused = r"cannot resume .*step-0000002 exactly with different settings: alpha 0.2 -> 0.7"
    with pytest.raises(ConfigError, match=refused):
        distill(teacher, char_tokenizer(), other, train_config(out, max_steps=4, resume=True))
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before
    distill(teacher, char_tokenizer(), config, train_config(out, max_steps=3, resume=True))  # the same settings go on
    assert list_checkpoints(out / "checkpoints")[-1].name == "step-0000003"


def test_init_from_continues_a_trained_student(corpus, teacher, tmp_path):
    config = DistillConfig(data="corpus", corpus=corpus, heldout_percent=25, seq_len=32, eval_chunks=4,
                           student=TINY_STUDENT, save_dtype="float32")
    first = distill(teacher, char_tokenizer(), config, train_config(tmp_path / "first", max_steps=30))
    # a second run from the first's folder starts where the first ended: its untrained score is the first's final
    wider = StudentConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1)  # the folder's shape wins
    again = DistillConfig(**{**config.__dict__, "student": wider, "init_from": tmp_path / "first"})
    distill(teacher, char_tokenizer(), again, train_config(tmp_path / "second", max_steps=2, lr=1e-9))
    summary = json.loads((tmp_path / "second" / "distill.json").read_text())
    assert summary["heldout_untrained"]["greedy_match"] == pytest.approx(first.eval["greedy_match"])
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "second").config.hidden_size == 16

    other = tiny_llama(seed=1, vocab_size=teacher.config.vocab_size + 8)
    other.save_pretrained(tmp_path / "other")
    wrong = DistillConfig(**{**config.__dict__, "init_from": tmp_path / "other"})
    with pytest.raises(ConfigError, match="own target's vocabulary"):
        distill(teacher, char_tokenizer(), wrong, train_config(tmp_path / "third", max_steps=1))
    with pytest.raises(ConfigError, match="not a student folder"):
        distill(teacher, char_tokenizer(), DistillConfig(**{**config.__dict__, "init_from": tmp_path}),
                train_config(tmp_path / "fourth", max_steps=1))


def test_embedding_init_keeps_the_most_of_the_target():
    target = tiny_llama(hidden_size=32, init_std=0.5)
    embedding = target.get_input_embeddings().weight
    student = build_student(target, StudentConfig(hidden_size=8, num_heads=2, num_kv_heads=1))
    projected = student.get_input_embeddings().weight
    basis = principal_basis(embedding, 8)
    assert torch.allclose(basis.T @ basis, torch.eye(8), atol=1e-5)
    assert torch.allclose(projected, embedding @ basis)
    # top principal directions keep more of the matrix than any other 8 coordinates, e.g. the first 8
    assert projected.norm() > embedding[:, :8].norm()
    assert torch.allclose(student.get_output_embeddings().weight, target.get_output_embeddings().weight @ basis)


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "1.5"], "alpha"),
    (["--temperature", "0"], "temperature"),
    (["--steps", "0"], "max_steps"),
    (["--hidden", "30", "--heads", "4"], "multiple"),
    (["--corpus", "/nonexistent/code"], "corpus not found"),
    (["--data", "web"], "data must be 'onpolicy' or 'corpus'"),
    (["--instruct-share", "2"], "instruct_share is a share"),
])
def test_bad_settings_raise_config_error(flags, message):
    result = CliRunner().invoke(app, ["train", "student", *flags])
    assert isinstance(result.exception, ConfigError), result.output
    assert message in str(result.exception)


# ---- on-policy data ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def documented_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("documented")
    for i in range(16):
        (root / f"lib_{i}.py").write_text(
            f"import os\n\n\ndef add_{i}(x, y):\n    \"\"\"Add {i}.\"\"\"\n    return x + y + {i}\n\n\n"
            f"class C{i}:\n    def m(self):\n        \"\"\"Method.\"\"\"\n        return {i}\n\n"
            f"def bare(x):\n    return x\n")
    return root


def chat_tokenizer():
    tokenizer = char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    return tokenizer


def test_function_prompts_end_after_the_docstring(documented_corpus):
    prompts = function_prompts(load_corpus(documented_corpus))
    assert len(prompts) == 32  # a function and a method per file; the undocumented function is skipped
    assert 'import os\n\n\ndef add_0(x, y):\n    """Add 0."""\n' in prompts
    assert 'import os\n\n\ndef m(self):\n    """Method."""\n' in prompts  # a method, dedented


ONPOLICY = dict(sequences=4, heldout_sequences=2, new_tokens=6, shard_size=2, top_logits=5, heldout_percent=25)


def test_onpolicy_data_resumes_where_it_stopped(documented_corpus, teacher, tmp_path, monkeypatch):
    import draftsmith.data.onpolicy as onpolicy

    config = OnPolicyConfig(corpus=str(documented_corpus), **ONPOLICY)
    build_onpolicy_shards(teacher, chat_tokenizer(), config, tmp_path / "straight", progress=False)

    real, calls = onpolicy.generate_shard, 0

    def cut_after_one(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise PowerCut
        return real(*args, **kwargs)

    monkeypatch.setattr(onpolicy, "generate_shard", cut_after_one)
    with pytest.raises(PowerCut):
        build_onpolicy_shards(teacher, chat_tokenizer(), config, tmp_path / "cut", progress=False)
    assert json.loads((tmp_path / "cut" / "manifest.json").read_text())["done"] == ["train/0"]
    monkeypatch.setattr(onpolicy, "generate_shard", real)
    calls_before = calls
    build_onpolicy_shards(teacher, chat_tokenizer(), config, tmp_path / "cut", progress=False)
    for split, index in (("train", 0), ("train", 1), ("heldout", 0)):
        name = f"{split}/shard-{index:05d}.safetensors"
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "cut" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert calls == calls_before  # the resumed run went back to the real generator for the two shards left
    more = OnPolicyConfig(corpus=str(documented_corpus), **{**ONPOLICY, "sequences": 6})
    build_onpolicy_shards(teacher, chat_tokenizer(), more, tmp_path / "cut", progress=False)  # adds a shard
    assert len(OnPolicyData(tmp_path / "cut", "train")) == 6 and len(OnPolicyData(tmp_path / "cut", "train", 4)) == 4
    with pytest.raises(ConfigError, match="other settings"):
        build_onpolicy_shards(teacher, chat_tokenizer(), OnPolicyConfig(corpus=str(documented_corpus),
                              **{**ONPOLICY, "new_tokens": 7}), tmp_path / "cut", progress=False)


def test_onpolicy_rows_are_the_targets_own_greedy_writing(documented_corpus, teacher, tmp_path):
    """Shards hold what the target wrote, aligned with its top logits: on a greedy shard each generated token
    is the top logit of the row before it, and equals transformers' greedy continuation of the prompt."""
    config = OnPolicyConfig(corpus=str(documented_corpus), **{**ONPOLICY, "sampled_share": 0.0})
    folder = build_onpolicy_shards(teacher, chat_tokenizer(), config, tmp_path / "data", progress=False)
    data = OnPolicyData(folder, "train")
    assert len(data) == 4
    n = config.new_tokens
    for i in range(len(data)):
        row = data[i]
        real = row["attention_mask"].bool()
        written = row["input_ids"][-n:][row["generated"].bool()]
        # each generated token is the top logit of the row that predicts it
        assert torch.equal(row["top_ids"][row["generated"].bool(), 0], written)
        prompt = row["input_ids"][real][: real.sum() - len(written)].tolist()
        assert written.tolist() == hf_greedy(teacher, prompt, len(written))
        assert row["position_ids"][real].tolist() == list(range(int(real.sum())))


def test_topk_loss_is_the_full_kl_when_k_covers_the_vocabulary():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    labels = torch.randint(0, 12, (2, 5))
    labels[1, 3:] = -100
    top = t.topk(12, dim=-1)
    sparse = topk_distill_loss(s, top.indices, top.values, labels, 0.3, 2.0)
    full = distill_loss(s, t, labels, (labels != -100).long(), 0.3, 2.0)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(sparse, full))


def test_onpolicy_distillation_raises_greedy_match(documented_corpus, teacher, tmp_path):
    out = tmp_path / "student"
    onpolicy = OnPolicyConfig(corpus=str(documented_corpus), **{**ONPOLICY, "sequences": 16, "heldout_sequences": 4,
                                                               "new_tokens": 24, "shard_size": 4})
    config = DistillConfig(data="onpolicy", onpolicy=onpolicy, student=TINY_STUDENT)
    result = distill(teacher, chat_tokenizer(), config, train_config(out, max_steps=60, eval_every=60))
    summary = json.loads((out / "distill.json").read_text())
    assert result.eval["greedy_match"] > summary["heldout_untrained"]["greedy_match"] + 0.05
    assert (out / "onpolicy" / "manifest.json").is_file()
    saved = load_file(str(out / "model.safetensors"))  # bf16 by default: half the file
    trained = load_file(str(list_checkpoints(out / "checkpoints")[-1] / "trainable.safetensors"))
    assert all(w.dtype == torch.bfloat16 and torch.equal(w, trained[n].to(torch.bfloat16)) for n, w in saved.items())
