"""The sandbox around a trial, through the real runner, bubblewrap and the fixture trainer with
misbehaviour spliced in: what is refused becomes a crash whose reason names the rule, nothing
leaks out, and an ordinary trainer is none the worse. Tests that need bubblewrap skip, saying
why, where it cannot build a sandbox; the fallback's tests run everywhere (on Linux)."""
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from autoresearch import sandbox
from autoresearch.patch import patch_constants
from autoresearch.runner import run_trial
from autoresearch.sandbox import isolation, probing
from conftest import ROOT, skip_or_fail_in_ci

FAKE = open(os.path.join(ROOT, "tests", "fixtures", "fake_train.py")).read()
BWRAP, WHY_NOT = sandbox.probe()
needs_bwrap = pytest.mark.usefixtures("bwrap_required")  # skips, or fails under CI


def fake_with(code, **constants):
    """The fixture trainer with `code` run right after its first progress line."""
    src = patch_constants(FAKE, constants) if constants else FAKE
    return src.replace("time.sleep(SLEEP)\n", f"time.sleep(SLEEP)\n{code}\n", 1)


@pytest.fixture
def box(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    if BWRAP is None:
        skip_or_fail_in_ci(f"no sandbox here: {WHY_NOT}")
    return sandbox.Sandbox(BWRAP)


@pytest.fixture
def fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    return sandbox.Sandbox(None, "forced by the test")


@pytest.fixture
def box_or_fallback(request):
    return lambda mode: request.getfixturevalue("box" if mode == "isolated" else "fallback")


def trial(tmp_path, source, data, box, name="t", time_limit=60):
    return run_trial(str(tmp_path / "runs" / name), source, time_limit, data.dir, sandbox=box)


class Listener:
    """A TCP listener on 127.0.0.1 that records every connection it is offered."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received = []
        self.done = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.received.append(conn.recv(100))
            conn.close()

    def close(self):
        self.done.set()
        time.sleep(0.3)
        self.sock.close()


def running(marker):
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    return out.split()


DAEMON = """
import subprocess, sys
if __import__('os').fork() == 0:  # a double fork into a new session: gone from the group
    __import__('os').setsid()
    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', '{marker}'])
    __import__('os')._exit(0)
__import__('os').wait()
open('daemon.started', 'w').write('yes')
"""


# --- isolated (bubblewrap) ------------------------------------------------------------------------

def test_an_ordinary_trainer_passes_and_leaves_a_clean_trial_directory(tmp_path, smoke_data, box):
    out = trial(tmp_path, fake_with("", MATRIX_LR=0.08), smoke_data, box)
    assert out.ok and out.summary["val_bpb"] == pytest.approx(1.02)
    assert sorted(os.listdir(tmp_path / "runs" / "t")) == ["run.log", "train.py"]


def test_no_network_not_even_loopback(tmp_path, smoke_data, box):
    listener = Listener()
    try:
        code = (f"import socket\nsocket.create_connection(('127.0.0.1', {listener.port}), "
                f"timeout=5).sendall(b'leak')")
        out = trial(tmp_path, fake_with(code), smoke_data, box)
    finally:
        listener.close()
    assert out.error.startswith("error: sandbox: no network (ConnectionRefusedError"), out.error
    assert listener.received == []


def test_no_writes_outside_the_trial_directory(tmp_path, smoke_data, box):
    outside = tmp_path / "pwned.txt"
    out = trial(tmp_path, fake_with(f"open({str(outside)!r}, 'w').write('pwned')"), smoke_data, box)
    assert out.error.startswith("error: sandbox: read-only (OSError: [Errno 30]"), out.error
    assert not outside.exists()


def test_writes_inside_the_trial_directory_and_tmpdir_work(tmp_path, smoke_data, box):
    code = ("import tempfile\nopen('mine.txt', 'w').write('ok')\n"
            "tempfile.NamedTemporaryFile().write(b'scratch')")
    out = trial(tmp_path, fake_with(code), smoke_data, box)
    assert out.ok, out.error
    assert (tmp_path / "runs" / "t" / "mine.txt").read_text() == "ok"


@pytest.mark.parametrize("path", ["os.path.join(os.environ['AUTORESEARCH_DATA'], 'val.bin')",
                                  "{real!r}"])
def test_the_validation_split_is_out_of_reach(tmp_path, smoke_data, box, path):
    real = os.path.join(smoke_data.dir, "val.bin")
    assert os.path.exists(real)
    code = (f"print('DATA', sorted(os.listdir(os.environ['AUTORESEARCH_DATA'])))\n"
            f"open({path.format(real=real)}, 'rb').read()")
    out = trial(tmp_path, fake_with(code), smoke_data, box)
    assert out.error.startswith("error: sandbox: no validation data (FileNotFoundError"), out.error
    listed = next(line for line in open(out.log) if line.startswith("DATA"))
    assert listed.strip() == f"DATA {sorted(sandbox.TRAIN_FILES)}"


def test_secrets_in_home_are_hidden(tmp_path, smoke_data, box, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("PRIVATE KEY")
    (home / ".netrc").write_text("machine x password hunter2")
    monkeypatch.setenv("HOME", str(home))
    code = (f"for p in [{str(home / '.ssh' / 'id_rsa')!r}, {str(home / '.netrc')!r}]:\n"
            f"    try:\n        print('READ', repr(open(p).read()))\n"
            f"    except OSError as e:\n        print('DENIED', type(e).__name__)")
    out = trial(tmp_path, fake_with(code), smoke_data, box)
    assert out.ok, out.error
    log = open(out.log).read()
    assert log.count("DENIED") + log.count("READ ''") == 2, log
    assert "PRIVATE KEY" not in log and "hunter2" not in log


def test_a_process_that_outlives_the_trial_is_killed_and_named(tmp_path, smoke_data, box):
    marker = f"outlive-{uuid.uuid4().hex}"
    out = trial(tmp_path, fake_with(DAEMON.format(marker=marker)), smoke_data, box)
    assert (tmp_path / "runs" / "t" / "daemon.started").exists()
    assert out.error.startswith("error: sandbox: a process outlived the trial"), out.error
    assert marker in out.error
    assert running(marker) == []


def test_a_crash_is_named_by_its_own_error_and_its_leftovers_go_all_the_same(tmp_path,
                                                                            smoke_data, box):
    marker = f"outlive-{uuid.uuid4().hex}"
    code = DAEMON.format(marker=marker) + "raise ValueError('boom')"
    out = trial(tmp_path, fake_with(code), smoke_data, box)
    assert out.error == "error: ValueError: boom" and running(marker) == []


@pytest.mark.parametrize("mode", ["isolated", "fallback"])
def test_killing_the_supervisor_is_caught(tmp_path, smoke_data, box_or_fallback, mode):
    out = trial(tmp_path, fake_with("os.kill(os.getppid(), 9)\ntime.sleep(5)"), smoke_data,
                box_or_fallback(mode))
    assert out.error.startswith("error: sandbox: no report from the trial's supervisor"), out.error


def test_a_runaway_file_is_cut_at_the_file_size_limit(tmp_path, smoke_data, box):
    box.limits = sandbox.Limits(file_size=1 << 20)
    out = trial(tmp_path, fake_with("open('big', 'wb').write(b'x' * (4 << 20))"), smoke_data, box)
    assert out.error.startswith("error: sandbox: file size"), out.error


def test_a_runaway_allocation_is_an_oom(tmp_path, smoke_data, box):
    box.limits = sandbox.Limits(memory=1 << 30)
    out = trial(tmp_path, fake_with("np.ones(1 << 28)"), smoke_data, box)  # 2 GiB
    assert out.error == "oom", out.error


def test_device_nodes_pass_through(tmp_path, smoke_data, box, monkeypatch):
    """What a GPU needs (/dev/nvidia*): a host device outside bwrap's minimal /dev."""
    minimal = {"null", "zero", "full", "random", "urandom", "tty", "console", "ptmx"}
    devices = [os.path.join("/dev", d) for d in sorted(os.listdir("/dev"))
               if d not in minimal and os.path.exists(os.path.join("/dev", d))
               and not os.path.isdir(os.path.join("/dev", d))
               and os.stat(os.path.join("/dev", d)).st_mode & 0o020000]
    if not devices:
        pytest.skip("no character device here besides bwrap's own")
    monkeypatch.setattr(isolation, "GPU_DEVICES", (devices[0],))
    code = f"import stat\nprint('CHAR', stat.S_ISCHR(os.stat({devices[0]!r}).st_mode))"
    out = trial(tmp_path, fake_with(code), smoke_data, box)
    assert out.ok and "CHAR True" in open(out.log).read()


def test_the_timeout_kills_everything_in_the_sandbox(tmp_path, smoke_data, box):
    marker = f"hang-{uuid.uuid4().hex}"
    code = f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', '{marker}'])"
    t0 = time.time()
    out = trial(tmp_path, fake_with(code, BEHAVIOUR="hang"), smoke_data, box, time_limit=3)
    assert out.error == "timeout" and time.time() - t0 < 20
    time.sleep(0.5)
    assert running(marker) == []


# --- choosing ---------------------------------------------------------------------------------

def test_choose_announces_what_it_is_and_refuses_on_without_a_sandbox(monkeypatch):
    said = []
    assert sandbox.choose("off", log=said.append) is None and "off" in said[-1]
    with pytest.raises(ValueError, match="auto, on, off"):
        sandbox.choose("maybe")
    monkeypatch.delenv("AUTORESEARCH_BWRAP", raising=False)
    monkeypatch.setattr(probing, "find_bwrap", lambda: None)
    with pytest.raises(sandbox.SandboxError, match="bwrap not found"):
        sandbox.choose("on", log=said.append)
    box = sandbox.choose("auto", log=said.append)
    assert not box.isolated and said[-1].startswith("sandbox: FALLBACK, trials are NOT isolated")


@needs_bwrap
def test_an_older_bwrap_gets_no_options_it_lacks(tmp_path):
    """Ubuntu 22.04 ships bubblewrap 0.6.1, before --size; Debian 11 ships 0.4, before --perms."""
    for version, size, perms in (("0.6.1", False, True), ("0.4.1", False, False),
                                 ("0.8.0", True, True)):
        old = tmp_path / f"bwrap-{version}"
        old.write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo "bubblewrap {version}" && exit 0\n'
                       f'exec {BWRAP} "$@"\n')
        old.chmod(0o755)
        args = isolation.base_args(str(old))
        assert ("--size" in args, "--perms" in args) == (size, perms)
        assert sandbox.probe(str(old)) == (str(old), None)


@needs_bwrap
def test_an_interpreter_in_a_hidden_place_still_runs(tmp_path):
    """A checkout and its venv in /tmp (where CI may clone), reached through a symlink: the
    sandbox hides /tmp, and shows the interpreter again as named and as resolved."""
    venv = tmp_path / "real-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (tmp_path / "checkout").mkdir()
    (tmp_path / "checkout" / ".venv").symlink_to(venv)
    python = tmp_path / "checkout" / ".venv" / "bin" / "python"
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); from autoresearch import sandbox; "
            f"print(sandbox.probe({BWRAP!r}))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == repr((BWRAP, None)), out.stdout + out.stderr


def test_a_bwrap_that_cannot_build_a_sandbox_is_detected(tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create a new namespace' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    path, why = sandbox.probe(str(fake))
    assert path is None and "No permissions to create a new namespace" in why


# --- the fallback -------------------------------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_fallback_still_hides_the_validation_split_by_path(tmp_path, smoke_data, fallback):
    code = "open(os.path.join(os.environ['AUTORESEARCH_DATA'], 'val.bin'), 'rb').read()"
    out = trial(tmp_path, fake_with(code), smoke_data, fallback)
    assert out.error.startswith("error: sandbox: no validation data"), out.error
    ok = trial(tmp_path, fake_with("", MATRIX_LR=0.08), smoke_data, fallback, name="ok")
    assert ok.ok and ok.summary["val_bpb"] == pytest.approx(1.02)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_fallback_kills_a_double_forked_daemon(tmp_path, smoke_data, fallback):
    marker = f"outlive-{uuid.uuid4().hex}"
    out = trial(tmp_path, fake_with(DAEMON.format(marker=marker)), smoke_data, fallback)
    assert out.error.startswith("error: sandbox: a process outlived the trial"), out.error
    assert running(marker) == []


def test_one_name_for_the_evaluation_socket():
    import prepare
    from autoresearch import protocol
    supervisor = open(sandbox.SUPERVISOR).read()
    assert prepare.EVAL_FD_ENV == protocol.EVAL_FD_ENV and f'"{prepare.EVAL_FD_ENV}"' in supervisor
