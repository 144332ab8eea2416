"""The sandbox runs model-written code in another process and stops what it must not do."""

import os
import uuid
from pathlib import Path

import pytest

from draftsmith.bench.sandbox import SandboxConfig, network_namespace_prefix, run_python

FAST = SandboxConfig(timeout_s=1.0)


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


@pytest.mark.skipif(not network_namespace_prefix(), reason="unshare --net is not allowed here")
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
