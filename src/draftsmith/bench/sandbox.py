"""Run untrusted, model-written Python in a separate, isolated, limited process.

Layers, from the outside in:
  - isolation (`SandboxResult.isolation` says which one a run had):
      * "unshare+setpriv" (as root): fresh mount, PID, network, IPC and UTS namespaces (`unshare`), a new
        read-only root holding only the system's programs and libraries, the interpreter and a few devices
        (the host's other files are not there to read), the work directory a size-limited tmpfs, then the
        program runs as uid/gid 65534 with no capabilities, no supplementary groups and no_new_privs
        (`setpriv`), as its PID namespace's init;
      * "bwrap" (bubblewrap; tried first when not root): the same plan through bwrap's own options. As root
        bwrap would map the sandbox user back to uid 0 outside, where RLIMIT_NPROC does not apply, so as root
        "unshare+setpriv" comes first;
      * "none": only the layers below. Refused (SandboxUnavailable) unless `allow_unisolated=True`
        (CLI: `--allow-unsandboxed`);
    each kind is probed once per process by running a small program in it that must find itself unprivileged
    and unable to write outside its work directory;
  - a fresh process group, killed as a whole on a wall-clock timeout, and the PID namespace's init killed
    by its host pid (the kernel then ends everything inside, whatever session or group it moved to);
  - `python -I -B`, a minimal environment, the program read from stdin (no file to find or rewrite);
  - resource limits (address space, CPU seconds, file size, processes, open files, no core dumps); as an
    unprivileged uid RLIMIT_NPROC=0 really forbids new processes, and the tmpfs caps all writes together;
  - an audit hook that refuses sockets, new processes, signals, C calls through ctypes, raising the limits
    and writes outside the work directory: it names what a careless program tried ("blocked"), it is not a
    boundary (CPython audit hooks never are).

How pass/fail is decided, and what a program can still forge: the harness writes a fresh nonce into a pipe
and keeps the other end of a second, "report" pipe. Only after the program has run to its end without an
error does the bootstrap read the nonce and write it to the report pipe; the run passes when the report pipe
holds exactly that nonce and the exit status is 0. Stdout is only output, and the nonce is in no Python object
while the program runs, so printing a marker, reading one from the caller's frame, exiting early with status
0 or catching our errors never passes. But the program runs in the bootstrap's own process, so it can do
anything the bootstrap can: a program written against this harness can read the nonce pipe itself, write the
nonce to the report pipe and exit 0 (both descriptors are in its process; their numbers are in the
bootstrap's frame). Nothing in-process can prevent that; a verdict the program cannot forge needs the tests'
assertions to run outside it. So pass@1 is trustworthy for model-written code that is not trying to game
this harness, and the isolation, not the verdict, is what protects the machine from code that is.
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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from draftsmith.errors import DraftsmithError

Status = Literal["passed", "failed", "timeout", "memory", "blocked"]
Isolation = Literal["bwrap", "unshare+setpriv", "none"]

EXIT_FAILED, EXIT_BLOCKED, EXIT_MEMORY, EXIT_SETUP = 1, 3, 4, 5
BLOCKED_MARK = "sandbox: blocked"
SETUP_MARK = "sandbox setup:"
TAIL_BYTES = 2000
NOBODY = 65534  # uid and gid the program runs as


class SandboxUnavailable(DraftsmithError):
    """No isolation works on this machine and running without it was not allowed."""


@dataclass(frozen=True)
class SandboxConfig:
    timeout_s: float = 10.0  # wall clock, startup included
    memory_mb: int = 1024  # address space (RLIMIT_AS): allocations beyond it raise MemoryError
    cpu_s: int | None = None  # CPU seconds; None = the wall timeout rounded up, plus one
    max_file_mb: int = 16  # largest file the program may write (its stdout and stderr included)
    work_mb: int = 64  # all files in the work directory together (its tmpfs's size; isolated runs only)
    max_processes: int = 0  # RLIMIT_NPROC: no new processes (holds because the program is not root)
    max_open_files: int = 64
    isolation: Literal["auto", "bwrap", "unshare+setpriv"] = "auto"  # auto: the first kind that works here
    allow_unisolated: bool = False  # without isolation, run anyway ("none") instead of raising
    audit_hook: bool = True  # tests turn it off to show that the OS layers hold on their own


@dataclass(frozen=True)
class SandboxResult:
    status: Status
    message: str  # one line: why it did not pass ("" when it passed)
    stdout: str  # tails of the program's output
    stderr: str
    seconds: float
    isolation: Isolation = "none"

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The bootstrap runs in the child as `python -I -B -c BOOTSTRAP limits nonce_fd report_fd audit`, reads the
# program from stdin, sets the limits, installs the audit hook, then runs the program; only when it ran to its
# end cleanly does it copy the nonce from nonce_fd to report_fd (see the module docstring).
_BOOTSTRAP = f"EXIT_FAILED, EXIT_BLOCKED, EXIT_MEMORY = {EXIT_FAILED}, {EXIT_BLOCKED}, {EXIT_MEMORY}\n"
_BOOTSTRAP += f"BLOCKED_MARK = {BLOCKED_MARK!r}\n"
_BOOTSTRAP += r"""
import json, linecache, os, sys, resource, traceback

def _main():
    limits, nonce_fd, report_fd, audit = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    source = sys.stdin.read()
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    program_path = "program.py"
    linecache.cache[program_path] = (len(source), None, source.splitlines(True), program_path)  # for tracebacks
    code = compile(source, program_path, "exec")
    del source
    for name, soft, hard in limits:
        resource.setrlimit(getattr(resource, name), (soft, hard))

    # Bound locally so that the program cannot swap them out from under the hook.
    realpath, fsdecode, sep, devnull, write, read, exit_now = (
        os.path.realpath, os.fsdecode, os.sep, os.devnull, os.write, os.read, os._exit)
    root = realpath(os.getcwd())
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
            # The event has no dir_fd: a relative path opened against another directory passes here; the
            # read-only mounts and the unprivileged uid are what stop that write.
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

    if audit == "1":
        sys.addaudithook(hook)
    sys.argv[:] = [program_path]
    def leave(status):  # os._exit skips the interpreter's flush: what the program printed must come back
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        exit_now(status)

    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except MemoryError:
        traceback.print_exc()
        leave(EXIT_MEMORY)
    except SystemExit as e:
        print(f"program called exit({e.code!r}) before it finished", file=sys.stderr)
        leave(EXIT_BLOCKED if violations else EXIT_FAILED)
    except BaseException:
        traceback.print_exc()
        leave(EXIT_BLOCKED if violations else EXIT_FAILED)
    sys.stdout.flush()
    sys.stderr.flush()
    if violations:  # it caught our PermissionError and carried on: still not a clean run
        exit_now(EXIT_BLOCKED)
    write(report_fd, read(nonce_fd, 64))
    exit_now(0)

_main()
"""

# The setup runs as root inside the fresh namespaces of "unshare+setpriv", before any untrusted code:
# `python -I -S -c SETUP spec_json`. It builds a new root file system holding only what the interpreter needs
# (bind mounts of its directories, the system's libraries, a few devices, a fresh /proc), pivots into it, makes
# every mount read-only, mounts the work tmpfs, enters it and execs `setpriv ... python BOOTSTRAP`.
_SETUP = f"SETUP_MARK, EXIT_SETUP = {SETUP_MARK!r}, {EXIT_SETUP}\n"
_SETUP += r"""
import ctypes, json, os, platform, struct, sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MNT_DETACH = 1, 2, 4, 8, 4096, 16384, 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}.get(platform.machine())
libc = ctypes.CDLL(None, use_errno=True)

def check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")

def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else os.fsencode(s)
    check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {source} on {target}")

def expose(path, root):
    # The host path appears at the same place under the new root: a symlink as the same symlink, anything
    # else as a bind mount (the rest of the host stays out of reach).
    if not os.path.lexists(path):
        return
    inside = root + path
    os.makedirs(os.path.dirname(inside), exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), inside)
        return
    if os.path.isdir(path):
        os.makedirs(inside, exist_ok=True)
    else:
        open(inside, "a").close()
    mount(path, inside, None, MS_BIND | MS_REC)

def enter(root):
    os.chdir(root)
    if SYS_PIVOT_ROOT is not None and libc.syscall(SYS_PIVOT_ROOT, b".", b".") == 0:
        check(libc.umount2(b".", MNT_DETACH), "detach the old root")  # the host's tree, stacked below
    else:  # no pivot_root here (e.g. an initramfs root): chroot, which the capability-less program cannot undo
        os.chroot(".")
    os.chdir("/")

def read_only_everywhere():
    # mount_setattr(2) (Linux 5.12+) makes every mount read-only in one call; older kernels: one by one.
    attr = struct.pack("QQQQ", 1, 0, 0, 0)  # MOUNT_ATTR_RDONLY
    if libc.syscall(442, -100, b"/", 0x8000, ctypes.c_char_p(attr), len(attr)) == 0:  # AT_FDCWD, AT_RECURSIVE
        return
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    for point in points:
        flags = os.statvfs(point).f_flag & (MS_NOSUID | MS_NODEV | 8 | 1024 | 2048)  # keep nosuid/nodev/noexec/...
        mount(None, point, None, 32 | MS_BIND | MS_RDONLY | flags)  # MS_REMOUNT

try:
    spec = json.loads(sys.argv[1])
    os.umask(0o022)
    root = spec["root"]
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for path in spec["expose"]:
        expose(path, root)
    os.makedirs(root + "/proc")
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # this PID namespace's only
    work = spec["work"]
    os.makedirs(root + work)
    enter(root)
    read_only_everywhere()
    mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={spec['work_bytes']},mode=0700,uid={spec['uid']},gid={spec['gid']}")
    os.chdir(work)  # the tmpfs, not the directory it covers
    os.execvp(spec["argv"][0], spec["argv"])
except Exception as e:
    os.write(2, f"{SETUP_MARK} {e}\n".encode(errors="replace"))
    os._exit(EXIT_SETUP)
"""

# What the sandboxed interpreter may read besides its own directories: the system's programs and libraries,
# the loader's cache, the time zone, and the harmless devices. Nothing else of the host (no /etc, /home, /tmp,
# /work, /proc of the host) exists inside.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache",
                "/etc/localtime", "/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


def _python_dirs() -> list[str]:
    """What the unprivileged interpreter must reach: its executable's directory and its prefixes."""
    dirs = {os.path.dirname(os.path.realpath(sys.executable)),
            os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}
    return sorted(d for d in dirs if not any(d.startswith(o + os.sep) for o in dirs))  # outermost only


def _python_argv(config: SandboxConfig, nonce_fd: int, report_fd: int) -> list[str]:
    return [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, json.dumps(_limits(config)), str(nonce_fd),
            str(report_fd), "1" if config.audit_hook else "0"]


def _tool(name: str) -> str:
    """The tool's full path as the harness finds it (the child's PATH is the minimal one)."""
    return shutil.which(name) or name


def _drop() -> list[str]:
    """setpriv: become uid/gid 65534 for good (no groups, no capabilities, no gaining any through exec)."""
    return [_tool("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs", "--"]


def _exposed_paths() -> list[str]:
    """Host paths the sandbox's new root shows: the system's, the interpreter's (outermost only: a path inside
    another is bound with it), and where symlinks among them point."""
    paths = {p for p in SYSTEM_PATHS if os.path.lexists(p)} | set(_python_dirs())
    paths |= {os.path.realpath(p) for p in list(paths) if os.path.islink(p)}
    def covered(p: str) -> bool:
        return any(p.startswith(o + os.sep) for o in paths if not os.path.islink(o))
    return sorted(p for p in paths if not covered(p))


def unshare_command(config: SandboxConfig, base: Path, program: list[str]) -> list[str]:
    """unshare (new namespaces, as root) -> the setup (a minimal read-only root, work tmpfs) -> setpriv (uid
    65534). The program is the PID namespace's init: killing it (`_kill_namespace`) ends everything inside."""
    (base / "root").mkdir()
    spec = {"root": str(base / "root"), "expose": _exposed_paths(), "work": str(base / "work"),
            "work_bytes": config.work_mb * 2**20, "uid": NOBODY, "gid": NOBODY, "argv": _drop() + program}
    return [_tool("unshare"), "--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "--kill-child",
            "--", sys.executable, "-I", "-S", "-B", "-c", _SETUP, json.dumps(spec)]


def bwrap_command(config: SandboxConfig, base: Path, program: list[str]) -> list[str]:
    """bubblewrap: the minimal root read-only, a fresh /dev and /proc, the work dir a tmpfs, every namespace new.

    As root, bwrap itself first drops to uid 65534 (setpriv): bwrap's --uid only renames the user inside its
    user namespace, and the sandbox would still be uid 0 to the kernel (RLIMIT_NPROC ignored). Verified once
    with bubblewrap 0.8.0 unpacked from the Debian package (not installed where this was written): the tests
    check this argv, and the probe runs it for real before a machine with bwrap uses it.
    """
    work = str(base / "work")
    return [*(_drop() if os.geteuid() == 0 else []), _tool("bwrap"), "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
            *_bwrap_root(), "--dev", "/dev", "--remount-ro", "/dev", "--proc", "/proc",  # /dev/shm too
            "--size", str(config.work_mb * 2**20), "--perms", "0700", "--tmpfs", work,  # --size/--perms: next tmpfs
            "--chdir", work, "--uid", str(NOBODY), "--gid", str(NOBODY), "--cap-drop", "ALL",
            "--", *program]


def _bwrap_root() -> list[str]:
    """The same minimal root as the unshare path's: the exposed host paths read-only (symlinks as symlinks),
    nothing else of the host; bwrap's own --dev gives the devices."""
    args = []
    for path in _exposed_paths():
        if path.startswith("/dev/"):
            continue
        args += ["--symlink", os.readlink(path), path] if os.path.islink(path) else ["--ro-bind", path, path]
    return args


_COMMANDS = {"unshare+setpriv": unshare_command, "bwrap": bwrap_command}
_TOOLS = {"unshare+setpriv": ("unshare", "setpriv"), "bwrap": ("bwrap",)}

# It must find itself unprivileged, unable to write anywhere but its work dir or to start a process, and alone
# on its network.
_PROBE = """
import os, socket
assert os.getuid() != 0 and os.geteuid() != 0, "runs as root"
for d in ("/", "/tmp", "/dev/shm", os.path.dirname(os.getcwd())):
    try:
        open(os.path.join(d, "draftsmith-sandbox-probe"), "w")
    except OSError:
        continue
    raise AssertionError(f"could write in {d}")
open("probe", "w").write("ok")
try:
    pid = os.fork()  # RLIMIT_NPROC=0 must hold: it does not for uid 0 outside a user namespace
except OSError:
    pass
else:
    if pid == 0:
        os._exit(0)
    raise AssertionError("may start processes")
assert [name for _, name in socket.if_nameindex()] == ["lo"], "sees a network interface"
"""


def _order() -> tuple[Isolation, ...]:
    # As root, bwrap maps its sandbox uid back to uid 0 outside (RLIMIT_NPROC and file owners as root), so
    # the unshare path, which really changes the uid, comes first; otherwise bwrap is the tool made for this.
    return ("unshare+setpriv", "bwrap") if os.geteuid() == 0 else ("bwrap", "unshare+setpriv")


@functools.cache
def probe_isolation(kind: Isolation) -> str | None:
    """None when `kind` works on this machine, else why not (checked once per process)."""
    missing = [tool for tool in _TOOLS[kind] if shutil.which(tool) is None]
    if missing:
        return f"{kind}: {', '.join(missing)} not found on PATH"
    if kind == "unshare+setpriv" and os.geteuid() != 0:
        return f"{kind}: needs root (mounts and the uid change)"
    result = _execute(_PROBE, SandboxConfig(timeout_s=20.0, audit_hook=False), kind)
    return None if result.passed else f"{kind}: probe {result.status}: {result.message}"


def available_isolation(config: SandboxConfig = SandboxConfig()) -> Isolation:
    """The isolation a run with `config` gets here: the first kind that works, else "none" (if allowed, else
    SandboxUnavailable says what is missing and how to opt out)."""
    kinds = _order() if config.isolation == "auto" else (config.isolation,)
    reasons = []
    for kind in kinds:
        reason = probe_isolation(kind)
        if reason is None:
            return kind
        reasons.append(reason)
    if config.allow_unisolated:
        return "none"
    raise SandboxUnavailable(
        "no sandbox isolation works on this machine (" + "; ".join(reasons) + "). Install bubblewrap (bwrap), "
        "or run as root where `unshare` and `setpriv` (util-linux) work; or accept running model-written code "
        "with only resource limits and an audit hook: SandboxConfig(allow_unisolated=True), CLI "
        "--allow-unsandboxed.")


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


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _kill_namespace(unshare_pid: int, wait_s: float = 2.0) -> None:
    """Kill the PID namespace's init (unshare's only child, the program itself once setpriv exec'd it); the
    kernel then kills every process left in the namespace. The process group alone is not enough: the program
    may leave it (setsid), and setpriv's uid change cleared the parent-death signal unshare gave it."""
    for init in _children(unshare_pid):
        try:
            os.kill(init, signal.SIGKILL)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + wait_s  # its exit waits for the namespace to empty
        while time.monotonic() < deadline and _alive(init):
            time.sleep(0.005)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _tail(path: Path) -> str:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - TAIL_BYTES))
        return f.read().decode("utf-8", errors="replace")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _feed(stdin, data: bytes) -> None:
    """Write the program to the child's stdin from a thread: a child that never reads cannot block us."""
    def write() -> None:
        try:
            stdin.write(data)
            stdin.close()
        except OSError:
            pass  # it died before reading: its exit status tells why
    threading.Thread(target=write, daemon=True).start()


def run_python(source: str, config: SandboxConfig = SandboxConfig()) -> SandboxResult:
    """Run `source` as a Python program in the sandbox; it passes when it runs to its end without error.

    Raises SandboxUnavailable when no isolation works here and `config.allow_unisolated` is false.
    """
    return _execute(source, config, available_isolation(config))


def _execute(source: str, config: SandboxConfig, isolation: Isolation) -> SandboxResult:
    base = Path(tempfile.mkdtemp(prefix="draftsmith-sandbox-"))
    nonce_r, nonce_w = os.pipe()
    report_r, report_w = os.pipe()
    try:
        base.chmod(0o711)  # the unprivileged program may pass through to its work dir, not list or write here
        work = base / "work"  # the program's cwd; isolated: a tmpfs mounted over it, gone with the namespace
        work.mkdir()
        program = _python_argv(config, nonce_r, report_w)
        cmd = _COMMANDS[isolation](config, base, program) if isolation != "none" else program
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
        nonce = secrets.token_hex(16).encode()
        os.write(nonce_w, nonce)  # fits the pipe's buffer; read only by a program that ran to its end
        os.close(nonce_w)
        start = time.perf_counter()
        with (base / "stdout").open("wb") as out, (base / "stderr").open("wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work, env=env,
                                    start_new_session=True, pass_fds=(nonce_r, report_w))
            os.close(report_w)  # now only the child holds a write end: EOF once it is gone
            report_w = -1
            try:
                _feed(proc.stdin, source.encode("utf-8"))
                finished = _wait_without_reaping(proc.pid, config.timeout_s)
            finally:
                if isolation == "unshare+setpriv":
                    _kill_namespace(proc.pid)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: anything it left running too
                except ProcessLookupError:
                    pass
                returncode = proc.wait()
        seconds = time.perf_counter() - start
        stdout, stderr = _tail(base / "stdout"), _tail(base / "stderr")
        os.set_blocking(report_r, False)
        try:
            report = os.read(report_r, 256)
        except BlockingIOError:  # a descendant still holds the write end and wrote nothing
            report = b""
    finally:
        for fd in (nonce_r, report_r, report_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(base, ignore_errors=True)

    blocked_line = next((line for line in stderr.splitlines() if line.startswith(BLOCKED_MARK)), "")
    setup_line = next((line for line in stderr.splitlines() if line.startswith(SETUP_MARK)), "")
    if not finished:
        status, message = "timeout", f"timed out after {config.timeout_s:g} s"
    elif returncode == EXIT_SETUP and setup_line:
        status, message = "failed", setup_line
    elif returncode == EXIT_BLOCKED or blocked_line:
        status, message = "blocked", blocked_line or _last_line(stderr)
    elif returncode == EXIT_MEMORY:
        status, message = "memory", f"MemoryError above the {config.memory_mb} MB limit"
    elif returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        status, message = "timeout", "CPU time limit exceeded"
    elif returncode == -signal.SIGXFSZ:
        status, message = "failed", f"wrote more than {config.max_file_mb} MB"
    elif returncode == 0 and report == nonce:
        status, message = "passed", ""
    elif returncode == 0:
        status, message = "failed", "exited before the end of the program"
    else:
        status, message = "failed", _last_line(stderr) or f"exit status {returncode}"
    return SandboxResult(status, message, stdout, stderr, seconds, isolation)
