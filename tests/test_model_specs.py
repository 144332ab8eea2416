"""How a model spec resolves where it could go slowly or wrong: hub ids with no hub, float16 on a CPU that has no
float16 arithmetic, and a GGUF path to the embedded model (or a copy) finding the heads shipped for it."""

import shutil
import socket
import time
import warnings

import pytest
import torch

from draftsmith import models
from draftsmith.artifacts import SHIPPED_HEADS, shipped_head_folder
from draftsmith.errors import ModelLoadError
from draftsmith.models import embedded_gguf, hub_access, load_model, resolve_dtype


@pytest.fixture
def silent_hub(monkeypatch):
    """A hub endpoint that accepts connections and never answers (what a firewall that drops packets, or a
    hung proxy, looks like)."""
    from huggingface_hub import constants

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(models, "HUB_PROBE_S", 0.5)
        yield


def test_a_hub_id_fails_after_one_short_try_when_the_hub_does_not_answer(silent_hub):
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"'someone/no-such-model' is a hub id, the hub at .* does not answer "
                                             r"\(.*Timeout\), and it is not in the local Hugging Face cache"):
        load_model("someone/no-such-model")
    assert time.monotonic() - start < 3


def test_hf_hub_offline_is_respected_without_touching_the_network(silent_hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="is a hub id, HF_HUB_OFFLINE is set, and it is not in the local"):
        load_model("someone/no-such-model")
    assert time.monotonic() - start < 0.4  # less than the probe's timeout: no probe was made


def test_a_cached_hub_model_loads_from_the_cache_when_the_hub_does_not_answer(silent_hub, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    assert hub_access("someone/cached-model") == {"local_files_only": True}


@pytest.mark.parametrize("flags, warns", [("fpu sse avx2 avx512f avx512_bf16", True),
                                          ("fpu avx2 avx512f avx512_fp16", False), ("fpu amx_fp16", False)])
def test_float16_on_a_cpu_without_float16_arithmetic_warns(monkeypatch, flags, warns):
    monkeypatch.setattr(models, "cpuinfo", lambda: f"flags\t\t: {flags}\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
        resolve_dtype("float32", torch.device("cpu"))
        resolve_dtype("bfloat16", torch.device("cpu"))
    assert [str(w.message).split(":")[0] for w in caught] == (["--dtype float16 on a CPU without float16 arithmetic "
                                                               "(no AVX-512 FP16 or AMX-FP16)"] if warns else [])


def test_a_gguf_path_finds_the_heads_shipped_for_the_model_it_holds(tmp_path):
    if not (SHIPPED_HEADS / "smollm2-eagle").is_dir():
        pytest.skip("no eagle head ships for smollm2 in this checkout")
    original = embedded_gguf("smollm2")
    copy = tmp_path / "elsewhere" / "my-model.gguf"
    copy.parent.mkdir()
    shutil.copyfile(original, copy)
    expected = shipped_head_folder("smollm2", "eagle")
    assert shipped_head_folder(str(original), "eagle") == expected
    assert shipped_head_folder(str(copy), "eagle") == expected
    assert shipped_head_folder(f"{copy}@bfloat16", "eagle") == expected  # a benchmark's cast target
    with copy.open("r+b") as f:  # another model of the same size: its own name, no heads
        f.seek(copy.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert shipped_head_folder(str(copy), "eagle") == SHIPPED_HEADS / f"{copy}-eagle"
    assert not shipped_head_folder(str(copy), "eagle").is_dir()
