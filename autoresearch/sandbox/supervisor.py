"""The trial supervisor, started with every sandboxed trial (so: standard library, few imports):

    python -I -S supervisor.py REPORT_FD -- ARGV...

runs ARGV (the trainer) as the subreaper of everything it forks. Once the trainer exits, its
leftover processes get LEFTOVER_GRACE seconds to go (compile workers exit right after their
parent), then are killed. A report goes to REPORT_FD, a pipe the trainer does not hold: a line
`returncode N`, then a line `leftover COMMAND LINE` per process killed. The supervisor exits
with the trainer's status.

It sits in the sandbox package but is never imported: it runs as a script and imports nothing
from autoresearch, so that every trial's start-up stays short.
"""
import os
import sys
import time

LEFTOVER_GRACE = 2.0  # inductor's compile workers are told to stop at exit, not waited for
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36
SIGKILL = 9  # the same everywhere; `import signal` would cost this start-up 20 ms (enum)


def _prctl(option, value):
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None).prctl(option, value)


def _children(pid):
    """Processes whose parent is `pid` (Linux: from /proc; elsewhere: pgrep)."""
    if not os.path.isdir("/proc"):
        with os.popen(f"pgrep -P {pid}") as out:
            return [int(x) for x in out.read().split()]
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            text = f.read().replace(b"\0", b" ").replace(b"\n", b" ").decode(errors="replace")
            return text.strip() or str(pid)
    except OSError:
        return str(pid)


def _reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def supervise(report_fd, argv):
    _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of the trial come here, not to init
    _prctl(PR_SET_DUMPABLE, 0)         # the trainer (same user) cannot ptrace us or open our fds
    os.set_inheritable(report_fd, False)
    trainer = os.fork()
    if trainer == 0:
        try:
            _prctl(PR_SET_PDEATHSIG, SIGKILL)
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    try:  # the evaluation socket is the trainer's alone: it must close when the trainer exits
        # protocol.EVAL_FD_ENV, spelled out: this file runs as `python -I -S`, without the package
        os.close(int(os.environ.get("AUTORESEARCH_EVAL_FD", "")))
    except (ValueError, OSError):
        pass
    _, status = os.waitpid(trainer, 0)
    returncode = os.waitstatus_to_exitcode(status)
    leftover, deadline = [], time.monotonic() + LEFTOVER_GRACE
    for _ in range(200):
        _reap()
        kids = _children(os.getpid())
        if not kids:
            break
        if time.monotonic() < deadline:
            time.sleep(0.02)
            continue
        for pid in kids:  # their own children come to us next round
            leftover.append(_cmdline(pid))
            try:
                os.kill(pid, SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    report = "".join([f"returncode {returncode}\n", *(f"leftover {c}\n" for c in leftover)])
    os.write(report_fd, report.encode())
    os.close(report_fd)
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    sys.exit(supervise(int(sys.argv[1]), sys.argv[3:]))
