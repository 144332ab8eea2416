"""Fused float32 CPU kernels for the lean forward's small operations, compiled once per machine and torch.

Why: on a small CPU a one-token step's weight products run near the memory's rate, but the ~20 small operations
a layer also does (norms, rotary embedding, cache writes, attention over one query, the MLP's gate) each pay
eager torch's per-operation overhead, a large share of a small model's step
(docs/results/2026-11-27-fused-cpu-kernels.md).
`csrc/fused_cpu.cpp` does each chain in one call. It is compiled with the machine's C++ compiler the first time
it is needed (about a minute; kept in draftsmith's cache folder and reused); without a compiler, or if the build
fails, the lean forward says why once and runs its eager operations. Used only below float32 on CPU, where the
forward is not bit-exact against transformers anyway (float32 keeps transformers' own operations).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

from draftsmith.machine import cpu_key
from draftsmith.paths import cache_dir

SOURCE = Path(__file__).parent / "csrc" / "fused_cpu.cpp"
DISABLE_ENV = "DRAFTSMITH_FUSED"  # "0": the lean forward's small operations stay eager (`--weights fp16-fused` still
# names the kernels' product)


def wanted(device: torch.device, fused: bool | None) -> bool:
    """Whether a lean forward on `device` should use the fused kernels: `fused` as given, by default (None) on
    CPU unless the environment turns them off."""
    if device.type != "cpu" or fused is False:
        return False
    return fused is True or os.environ.get(DISABLE_ENV, "1") != "0"


# -march=native: a build is for one instruction set, so the CPU is part of its tag (a shared home folder);
# -fopenmp: at::parallel_for splits work only when compiled with OpenMP (torch's own libgomp is the one loaded).
# ISA_ENV=avx2 builds for AVX2 (with FMA and F16C) only: how an AVX-512 machine tests what AVX2-only CPUs run.
ISA_ENV = "DRAFTSMITH_ISA"
ISA_FLAGS = {"native": ["-march=native"], "avx2": ["-mavx2", "-mfma", "-mf16c"]}
FLAGS = ["-O3", *ISA_FLAGS.get(os.environ.get(ISA_ENV, "native"), ISA_FLAGS["native"]), "-fopenmp"]


@functools.cache
def build_tag() -> str:
    """Names one build: the source, the flags, torch's version and the CPU. Cost calibrations of a fused forward
    carry it too, since a change to a kernel changes what a step costs."""

    return hashlib.sha256(f"{SOURCE.read_text()}{FLAGS}{torch.__version__}{cpu_key()}".encode()).hexdigest()[:12]


def _loaded_in_process() -> bool:
    """Whether a build of the kernels is already loaded: a second one (another cache folder, as after a change
    of XDG_CACHE_HOME) would register the same operators again, which aborts the process."""
    try:
        torch.ops.draftsmith_fused.rms_norm
    except (AttributeError, RuntimeError):
        return False
    return True


@functools.cache
def fused_ops():
    """torch.ops.draftsmith_fused, built on first use; None (with one warning saying why) where it cannot be."""
    from torch.utils import cpp_extension

    if _loaded_in_process():
        return torch.ops.draftsmith_fused
    tag = build_tag()
    name, build = f"draftsmith_fused_{tag}", cache_dir() / "fused" / tag
    build.mkdir(parents=True, exist_ok=True)
    if not (build / f"{name}.so").is_file():
        print("draftsmith: compiling fused CPU kernels (once per machine, about a minute)...", file=sys.stderr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cpp_extension's notes on compiler versions
            cpp_extension.load(name, [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                               build_directory=str(build), is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: each has its own exception type
        warnings.warn(f"fused CPU kernels unavailable, running eager operations: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}", stacklevel=2)
        return None
    return torch.ops.draftsmith_fused
