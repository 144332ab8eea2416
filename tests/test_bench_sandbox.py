"""The sandbox runs model-written code in another process and stops what it must not do."""

import dataclasses
import os
import socket
import uuid
from pathlib import Path

import pytest

from draftsmith.bench import sandbox
from draftsmith.bench.sandbox import SandboxConfig, SandboxUnavailable, available_isolation, run_python

ISOLATION = available_isolation()  # "none" on a machine where no layer works: those tests are skipped
FAST = SandboxConfig(timeout_s=1.0, allow_unisolated=ISOLATION == "none")
NO_HOOK = dataclasses.replace(FAST, timeout_s=5.0, audit_hook=False)  # the OS layers alone
isolated = pytest.mark.skipif(ISOLATION == "none", reason="no sandbox isolation works on this machine")


def test_normal_program_passes_and_its_output_comes_back():
    result = run_python("import math\nprint(math.factorial(5))\n", FAST)
    assert result.passed and result.status == "passed"
    assert result.stdout == "120\n"


def test_exception_fails_with_its_message():
    result = run_python("assert 1 + 1 == 3, 'bad arithmetic'\n", FAST)
    assert not result.passed and result.status == "failed"
    assert "AssertionError: bad arithmetic" in result.message


def test_infinite_loop_times_out():
    result = run_python("while True:\n    pass\n", FAST)
    assert result.status == "timeout" and not result.passed
    assert result.seconds < FAST.timeout_s + 2


def test_allocating_4gb_is_stopped():
    result = run_python("x = bytearray(4 * 1024**3)\nprint('allocated')\n", FAST)
    assert result.status == "memory" and not result.passed
    assert "allocated" not in result.stdout


def test_network_connection_is_blocked():
    code = "import socket\ns = socket.socket()\ns.connect(('1.1.1.1', 80))\n"
    result = run_python(code, FAST)
    assert result.status == "blocked" and not result.passed
    assert "socket" in result.message


@isolated
def test_network_namespace_has_only_loopback():
    result = run_python("import socket\nprint([name for _, name in socket.if_nameindex()])\n", FAST)
    assert result.passed and result.stdout.strip() == "['lo']"


def test_write_outside_workdir_is_blocked_even_when_the_error_is_caught():
    target = Path(f"/tmp/draftsmith-sandbox-escape-{uuid.uuid4().hex}")
    code = f"try:\n    open({str(target)!r}, 'w').write('x')\nexcept OSError:\n    pass\nprint('carried on')\n"
    result = run_python(code, FAST)
    assert result.status == "blocked" and not result.passed
    assert not target.exists()


def test_writes_inside_the_workdir_work_and_the_workdir_is_deleted():
    code = "import os\nopen('notes.txt', 'w').write('hi')\nprint(os.getcwd())\n"
    result = run_python(code, FAST)
    assert result.passed
    workdir = Path(result.stdout.strip())
    assert workdir.name == "work" and not workdir.exists()


@pytest.mark.parametrize("code", ["import os\nos.system('true')\n", "import subprocess\nsubprocess.run(['true'])\n",
                                  "import os\nos.kill(os.getppid(), 0)\n"])
def test_processes_and_signals_are_blocked(code):
    assert run_python(code, FAST).status == "blocked"


@pytest.mark.parametrize("code", ["import os\nos._exit(0)\nraise SystemExit\n", "import sys\nsys.exit(0)\n"])
def test_exiting_early_is_not_a_pass(code):
    result = run_python(code + "assert False\n", FAST)
    assert result.status == "failed"


def test_caller_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("DRAFTSMITH_SECRET", "s3cret")
    result = run_python("import os\nprint(os.environ.get('DRAFTSMITH_SECRET'))\n", FAST)
    assert result.stdout.strip() == "None"
    assert os.environ["DRAFTSMITH_SECRET"] == "s3cret"


# --- the escapes of the isolation issue: each must fail, with and without the audit hook ---

def test_write_outside_through_a_directory_descriptor_does_not_land(tmp_path_factory):
    # The audit hook's "open" event carries no dir_fd, so a relative path looked inside the work dir.
    name = f"draftsmith-sandbox-escape-{uuid.uuid4().hex}"
    code = (f"import os\nfd = os.open('/tmp', os.O_RDONLY)\n"
            f"os.close(os.open({name!r}, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))\n")
    for config in (FAST, NO_HOOK):
        result = run_python(code, config)
        assert not result.passed and not (Path("/tmp") / name).exists(), result
    caught = f"try:\n    {code.replace(chr(10), chr(10) + '    ').rstrip()}\nexcept OSError:\n    pass\n"
    run_python(caught, NO_HOOK)
    assert not (Path("/tmp") / name).exists()


def test_reading_the_marker_from_the_callers_frame_does_not_forge_a_pass():
    # what the issue reproduced: the bootstrap's frame held the nonce that stdout had to end with
    forge = ("import os, sys\n"
             "caller = sys._getframe(1).f_locals\n"
             "print(); print(caller.get('nonce', '')); sys.stdout.flush()\n"
             "os._exit(0)\n")
    result = run_python(forge + "assert False\n", FAST)
    assert not result.passed and result.status == "failed"


def test_total_writes_are_capped_not_only_each_file():
    # four files each under the per-file limit, together twice the work dir's size
    config = dataclasses.replace(NO_HOOK, work_mb=8, max_file_mb=4)
    code = "for i in range(4):\n    open(f'f{i}', 'wb').write(b'x' * (4 * 2**20 - 1))\n"
    result = run_python(code, config)
    assert result.status == "failed" and "No space left" in result.message, result


def test_network_is_unreachable_even_without_the_audit_hook():
    with socket.socket() as server:  # a port this process listens on: the sandbox must not reach it
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
        result = run_python(code, NO_HOOK)
    assert result.status == "failed" and "Error" in result.message, result


def test_the_program_runs_as_an_unprivileged_user_that_cannot_fork():
    code = "import os\nprint(os.getuid(), os.geteuid())\nos.fork()\n"
    result = run_python(code, NO_HOOK)
    assert result.status == "failed" and "Resource temporarily unavailable" in result.message, result
    uid, euid = map(int, result.stdout.split())
    assert uid == euid != 0


def test_the_system_is_read_only_to_the_program():
    code = ("import os\nfor d in ('/tmp', '/var/tmp', '/dev/shm', os.path.dirname(os.getcwd())):\n"
            "    try:\n        open(os.path.join(d, 'draftsmith-probe'), 'w')\n"
            "    except OSError as e:\n        print(type(e).__name__)\n    else:\n        print('wrote', d)\n")
    result = run_python(code, NO_HOOK)
    assert result.passed and "wrote" not in result.stdout, result.stdout


def test_the_isolation_is_reported():
    result = run_python("pass\n", FAST)
    assert result.isolation == ISOLATION != "none"


def test_no_isolation_is_refused_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "probe_isolation", lambda kind: f"{kind} is missing (simulated)")
    with pytest.raises(SandboxUnavailable, match="allow_unisolated") as error:
        run_python("pass\n", FAST)
    assert "bwrap" in str(error.value) and "--allow-unsandboxed" in str(error.value)
    result = run_python("print('ran')\n", dataclasses.replace(FAST, allow_unisolated=True))
    assert result.passed and result.isolation == "none"


def test_bwrap_command(monkeypatch, tmp_path):
    # bwrap is not installed here: check the argv (it was run for real once, from the unpacked Debian package)
    config = SandboxConfig(work_mb=8)
    for euid in (1000, 0):
        monkeypatch.setattr(os, "geteuid", lambda: euid)
        argv = sandbox.bwrap_command(config, tmp_path, ["python", "-c", "pass"])
        start = argv.index(next(a for a in argv if a.endswith("bwrap")))
        assert (start > 0) == (euid == 0)  # as root, setpriv drops to 65534 before bwrap
        if euid == 0:
            assert argv[0].endswith("setpriv") and f"--reuid={sandbox.NOBODY}" in argv[:start]
        args = argv[start:]
        work = str(tmp_path / "work")
        for option in ("--unshare-all", "--unshare-user", "--die-with-parent", "--new-session"):
            assert option in args
        bound = [args[i + 1] for i, a in enumerate(args) if a == "--ro-bind"]
        assert "/" not in bound and "/usr" in bound and set(bound) <= set(sandbox._exposed_paths())  # no host /
        assert args[args.index("--remount-ro") + 1] == "/dev"
        size, tmpfs = args.index("--size"), args.index("--tmpfs")
        assert args[size + 1] == str(8 * 2**20) and size < tmpfs and args[tmpfs + 1] == work  # --size: next tmpfs
        assert args[args.index("--chdir") + 1] == work and args[args.index("--uid") + 1] == str(sandbox.NOBODY)
        assert args[args.index("--cap-drop") + 1] == "ALL"
        assert args[args.index("--") + 1 :] == ["python", "-c", "pass"]


def test_each_humaneval_record_says_which_isolation_its_tests_had():
    from draftsmith.bench.humaneval import load_problems
    from draftsmith.bench.runner import Call, Output, make_records
    from draftsmith.bench.workloads import Task

    problem = load_problems(1)[0]
    task = Task(problem.task_id, problem.prompt, problem=problem)
    calls = [Call("plain", task.task_id, 0, Output([1, 2], 0.1, 2), None)]
    record, = make_records(calls, [task], lambda ids: "    return False\n", sandbox=FAST)
    assert record.passed is False and record.sandbox == ISOLATION
    record, = make_records(calls, [task], lambda ids: "    return False\n", run_tests=False)
    assert record.passed is None and record.sandbox is None


# --- the escapes of the hardening issue: outliving the timeout, reading the host's files ---

def _processes_named(comm: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == comm:
                found.append(int(entry.name))
        except OSError:
            pass
    return found


@isolated
@pytest.mark.parametrize("escape", ["os.setsid()", "os.setpgid(0, 0)", "signal.signal(signal.SIGTERM, signal.SIG_IGN)"])
def test_no_process_outlives_the_timeout(escape):
    # The program renames itself (prctl PR_SET_NAME) so that this test can look for it among the host's
    # processes, leaves the process group the harness kills, and sleeps past the timeout.
    tag = uuid.uuid4().hex[:15]
    code = (f"import ctypes, os, signal, time\n{escape}\n"
            f"ctypes.CDLL(None).prctl(15, {tag.encode()!r}, 0, 0, 0)\n"
            "print('started', flush=True)\ntime.sleep(60)\n")
    result = run_python(code, dataclasses.replace(NO_HOOK, timeout_s=2.0))
    assert result.status == "timeout" and "started" in result.stdout, result
    assert _processes_named(tag) == []


@isolated
def test_the_hosts_files_are_not_readable(tmp_path):
    secret = tmp_path / "secret.txt"  # world-readable, in a world-searchable directory
    secret.write_text("s3cret")
    secret.chmod(0o644)
    tmp_path.chmod(0o755)
    probes = [str(secret), "/etc/hostname", "/etc/passwd", str(Path(__file__).resolve())]
    code = ("import os\nfor path in " + repr(probes) + ":\n"
            "    try:\n        open(path, 'rb').read()\n"
            "    except OSError as e:\n        print(type(e).__name__)\n"
            "    else:\n        print('read', path)\n"
            "print(sorted(os.listdir('/')))\n"
            "print((os.listdir('/tmp'), [p for p in os.listdir('/proc') if p.isdigit()]))\n")
    result = run_python(code, NO_HOOK)
    assert result.passed, result
    lines = result.stdout.splitlines()
    assert lines[:len(probes)] == ["FileNotFoundError"] * len(probes), lines
    top = eval(lines[-2])
    assert set(top) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "root", "sbin", "tmp", "usr"}
    only_work, only_itself = eval(lines[-1])  # /tmp holds the work dir's base only; /proc the program only
    assert len(only_work) == 1 and only_work[0].startswith("draftsmith-sandbox-") and only_itself == ["1"]
