"""Run untrusted, model-written Python in a separate, limited process.

Layers, from the outside in:
  - a fresh process group in its own network namespace when `unshare --net` works here (else skipped),
    killed as a whole on a wall-clock timeout;
  - `python -I -B` (ignores PYTHON* variables and user site, writes no bytecode), a minimal environment,
    and a fresh temporary working directory, deleted afterwards;
  - resource limits (address space, CPU seconds, file size, processes, open files, no core dumps);
  - an audit hook, installed by a small bootstrap before the program runs, that refuses sockets, new
    processes, signals, C calls through ctypes, raising the limits, and any write outside the working directory.
The audit hook stops careless or buggy code, not a determined attacker who knows it is there (CPython
audit hooks are not a security boundary); the namespace, the limits and the process boundary are the
parts that hold regardless. The caller's process never executes the code, so it survives anything.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["passed", "failed", "timeout", "memory", "blocked"]

EXIT_FAILED, EXIT_BLOCKED, EXIT_MEMORY = 1, 3, 4
BLOCKED_MARK = "sandbox: blocked"
TAIL_BYTES = 2000


@dataclass(frozen=True)
class SandboxConfig:
    timeout_s: float = 10.0  # wall clock, startup included
    memory_mb: int = 1024  # address space (RLIMIT_AS): allocations beyond it raise MemoryError
    cpu_s: int | None = None  # CPU seconds; None = the wall timeout rounded up, plus one
    max_file_mb: int = 16  # largest file the program may write (its stdout and stderr included)
    max_processes: int = 0  # RLIMIT_NPROC: no new processes (root ignores it; the audit hook does not)
    max_open_files: int = 64
    network_namespace: bool = True  # use `unshare --net` when this machine allows it


@dataclass(frozen=True)
class SandboxResult:
    status: Status
    message: str  # one line: why it did not pass ("" when it passed)
    stdout: str  # tails of the program's output
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The bootstrap runs in the child as `python -I -B -c BOOTSTRAP workdir program limits`, reads a nonce from
# stdin, sets the limits, installs the audit hook, then runs the program. Only a program that runs to its
# end prints the nonce, so os._exit(0) or sys.exit() half way through never counts as a pass.
_BOOTSTRAP = f"EXIT_FAILED, EXIT_BLOCKED, EXIT_MEMORY = {EXIT_FAILED}, {EXIT_BLOCKED}, {EXIT_MEMORY}\n"
_BOOTSTRAP += f"BLOCKED_MARK = {BLOCKED_MARK!r}\n"
_BOOTSTRAP += r"""
import json, os, sys, resource, traceback

def _main():
    work, program_path, limits = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    nonce = sys.stdin.readline().strip()
    with open(program_path, encoding="utf-8") as f:
        code = compile(f.read(), program_path, "exec")
    for name, soft, hard in limits:
        resource.setrlimit(getattr(resource, name), (soft, hard))

    # Bound locally so that the program cannot swap them out from under the hook.
    realpath, fsdecode, sep, devnull, write, exit_now = (
        os.path.realpath, os.fsdecode, os.sep, os.devnull, os.write, os._exit)
    root = realpath(work)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    forbidden = frozenset({
        "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr",
        "socket.getnameinfo", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
        "os.fork", "os.forkpty", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
        "ctypes.dlsym", "resource.setrlimit", "resource.prlimit"})
    blocked_imports = frozenset({"_posixsubprocess"})  # fork_exec without the subprocess.Popen event
    # event -> (indices of path arguments, indices of dir_fd arguments)
    path_events = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)),
        "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)),
        "os.truncate": ((0,), ()), "os.mkfifo": ((0,), (2,)), "os.mknod": ((0,), (3,)),
        "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()), "sqlite3.connect": ((0,), ())}
    violations = []

    def inside(path):
        if isinstance(path, int):  # an already open descriptor: only opens we allowed made writable ones
            return True
        p = realpath(fsdecode(path))
        return p == root or p.startswith(root + sep) or p == devnull

    def block(event, detail):
        violations.append(event)
        write(2, f"{BLOCKED_MARK} {event} {detail}\n".encode(errors="replace"))
        raise PermissionError(f"sandbox: {event} is not allowed")

    def hook(event, args):
        if event in forbidden:
            block(event, "")
        elif event == "open":
            if args[2] & write_flags and not inside(args[0]):
                block(event, f"{args[0]!r} for writing")
        elif event in path_events:
            paths, dir_fds = path_events[event]
            if any(args[i] not in (None, -1) for i in dir_fds):
                block(event, "relative to a directory descriptor")
            for i in paths:
                if not inside(args[i]):
                    block(event, repr(args[i]))
        elif event == "import" and args[0] in blocked_imports:
            block(event, args[0])
        elif event == "ctypes.dlopen" and args[0] is not None:
            # ctypes itself may load (numpy imports it); looking up a C function (dlsym) may not
            block(event, repr(args[0]))

    sys.addaudithook(hook)
    sys.argv[:] = [program_path]
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except MemoryError:
        traceback.print_exc()
        exit_now(EXIT_MEMORY)
    except SystemExit as e:
        print(f"program called exit({e.code!r}) before it finished", file=sys.stderr)
        exit_now(EXIT_BLOCKED if violations else EXIT_FAILED)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        exit_now(EXIT_BLOCKED if violations else EXIT_FAILED)
    sys.stdout.flush()
    sys.stderr.flush()
    if violations:  # it caught our PermissionError and carried on: still not a clean run
        exit_now(EXIT_BLOCKED)
    write(1, f"\n{nonce}\n".encode())
    exit_now(0)

_main()
"""


@functools.cache
def network_namespace_prefix() -> tuple[str, ...]:
    """The command prefix that runs a program without network on this machine, or () if none works."""
    if shutil.which("unshare") is None:
        return ()
    for prefix in (("unshare", "--net"), ("unshare", "--user", "--map-root-user", "--net")):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def _limits(config: SandboxConfig) -> list[tuple[str, int, int]]:
    cpu = config.cpu_s if config.cpu_s is not None else int(config.timeout_s) + 2
    mem = config.memory_mb * 2**20
    fsize = config.max_file_mb * 2**20
    return [
        ("RLIMIT_AS", mem, mem),
        ("RLIMIT_CPU", cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
        ("RLIMIT_FSIZE", fsize, fsize),
        ("RLIMIT_NPROC", config.max_processes, config.max_processes),
        ("RLIMIT_NOFILE", config.max_open_files, config.max_open_files),
        ("RLIMIT_CORE", 0, 0),
    ]


def _wait_without_reaping(pid: int, timeout_s: float) -> bool:
    """Wait until the child exits, leaving it a zombie so its process group id cannot be reused yet."""
    deadline, delay = time.monotonic() + timeout_s, 0.001
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(delay)
        delay = min(2 * delay, 0.02)
    return False


def _tail(path: Path) -> str:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - TAIL_BYTES))
        return f.read().decode("utf-8", errors="replace")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def run_python(source: str, config: SandboxConfig = SandboxConfig()) -> SandboxResult:
    """Run `source` as a Python program in the sandbox; it passes when it runs to its end without error."""
    base = Path(tempfile.mkdtemp(prefix="draftsmith-sandbox-"))
    try:
        work = base / "work"  # the only place the program may write; its outputs and source live beside it
        work.mkdir()
        program = base / "program.py"
        program.write_text(source, encoding="utf-8")
        prefix = network_namespace_prefix() if config.network_namespace else ()
        cmd = [*prefix, sys.executable, "-I", "-B", "-c", _BOOTSTRAP,
               str(work), str(program), json.dumps(_limits(config))]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
        nonce = secrets.token_hex(16)
        start = time.perf_counter()
        with (base / "stdout").open("wb") as out, (base / "stderr").open("wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work, env=env,
                                    start_new_session=True)
            try:
                try:
                    proc.stdin.write(f"{nonce}\n".encode())
                    proc.stdin.close()
                except OSError:
                    pass  # it died before reading: its exit status tells why
                finished = _wait_without_reaping(proc.pid, config.timeout_s)
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: anything it left running too
                except ProcessLookupError:
                    pass
                returncode = proc.wait()
        seconds = time.perf_counter() - start
        stdout, stderr = _tail(base / "stdout"), _tail(base / "stderr")
    finally:
        shutil.rmtree(base, ignore_errors=True)

    completed = stdout.endswith(f"\n{nonce}\n")
    stdout = stdout.removesuffix(f"\n{nonce}\n")
    blocked_line = next((line for line in stderr.splitlines() if line.startswith(BLOCKED_MARK)), "")
    if not finished:
        status, message = "timeout", f"timed out after {config.timeout_s:g} s"
    elif returncode == EXIT_BLOCKED or blocked_line:
        status, message = "blocked", blocked_line or _last_line(stderr)
    elif returncode == EXIT_MEMORY:
        status, message = "memory", f"MemoryError above the {config.memory_mb} MB limit"
    elif returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        status, message = "timeout", "CPU time limit exceeded"
    elif returncode == -signal.SIGXFSZ:
        status, message = "failed", f"wrote more than {config.max_file_mb} MB"
    elif returncode == 0 and completed:
        status, message = "passed", ""
    elif returncode == 0:
        status, message = "failed", "exited before the end of the program"
    else:
        status, message = "failed", _last_line(stderr) or f"exit status {returncode}"
    return SandboxResult(status, message, stdout, stderr, seconds)
