"""Nothing a trial starts outlives it: the trainer dies with the loop, the supervisor's report of
what outlived the trainer is read back, and, where no pid namespace ends them (the fallback, or a
trial killed while bwrap was starting), the processes carrying the trial's mark are killed."""
import ctypes
import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field

TRIAL_ENV = "AUTORESEARCH_TRIAL"  # marks every process of a trial, for the fallback's cleanup

_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


@dataclass
class Report:
    """What the supervisor saw: the trainer's return code and what outlived it."""
    returncode: int = None
    leftover: list = field(default_factory=list)
    missing: bool = False   # no report at all: the supervisor was killed


def read_report(fd, timeout=5.0):
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    report = Report(missing=True)
    for line in b"".join(chunks).decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        if key == "returncode" and value.lstrip("-").isdigit():
            report.returncode, report.missing = int(value), False
        elif key == "leftover" and len(report.leftover) < 20:
            report.leftover.append(value)
    return report


def kill_marked(trial_id):
    """Kill whatever still runs with this trial's mark in its environment; their command lines."""
    import psutil
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(TRIAL_ENV) == trial_id:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    names = []
    for p in found:
        try:
            names.append(" ".join(p.cmdline())[:200] or p.name())
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(found, timeout=5)
    return names


def die_with_parent():
    """Linux: if the loop itself is killed (kill -9), the kernel kills the trainer too, so no
    orphan keeps the GPU busy while the loop is restarted. (Runs between fork and exec.)"""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def become_subreaper():
    """Fallback: orphans of a trial whose supervisor was killed come to the loop, not init."""
    if _LIBC is not None:
        _LIBC.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
