"""What machine this is, as the caches of measured choices key it: /proc/cpuinfo and the CPU's identity."""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path


@functools.cache
def cpuinfo() -> str:
    """/proc/cpuinfo's text, read once ("" where there is none)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@functools.cache
def cpu_key() -> str:
    """The CPU's model name and a hash of its instruction sets: one model name (\"AMD EPYC\" on a cloud VM)
    covers machines with and without AVX-512, whose fastest kernels differ."""
    lines = cpuinfo().splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1] for line in lines if line.startswith("flags")), "")
    return f"{name}-{hashlib.sha256(' '.join(sorted(flags.split())).encode()).hexdigest()[:8]}"
