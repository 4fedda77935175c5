"""`loop.py --workers N`: N loops on one machine sharing one study, one per GPU.

The parent opens the study (the journal file beside results.tsv unless --storage names another),
seeds it with an older results.tsv once, then starts N ordinary `loop.py --storage`
processes, worker i pinned to GPU i (CUDA_VISIBLE_DEVICES) or, with no GPU, to cores/N threads,
and waits for them. The workers coordinate only through the storage; the parent's job is to
start them, split --trials between them, and pass Ctrl-C on.
"""
import os
import signal
import subprocess
import sys

from autoresearch.sandbox import die_with_parent

LOOP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "loop.py")
_OWN_FLAGS = {"--workers": 1, "--gpus": 1, "--trials": 1, "--storage": 1, "--study": 1,
              "--worker-slot": 1}


class WorkersError(ValueError):
    """A --workers/--gpus request the machine cannot honour."""


def split(total, n):
    """--trials for each of n workers: the total split as evenly as it goes (None: unlimited)."""
    if total is None:
        return [None] * n
    return [total // n + (i < total % n) for i in range(n)]


def placements(n, gpus=None, cores=None, cuda_count=None):
    """(worker name suffix, environment) for each worker: a GPU each, or a share of the cores."""
    if gpus is None and cuda_count is None:
        import torch
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus is None and cuda_count:
        gpus = list(range(cuda_count))
    if gpus:
        if n > len(gpus):
            raise WorkersError(f"{n} workers need {n} GPUs, and {len(gpus)} are there "
                               f"({', '.join(map(str, gpus))}); lower --workers or name more "
                               f"with --gpus")
        return [{"CUDA_VISIBLE_DEVICES": str(g)} for g in gpus[:n]]
    cores = cores or os.cpu_count() or 1
    threads = max(1, cores // n)
    return [{"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} for _ in range(n)]


def child_argv(argv, storage, study, slot, trials):
    """The parent's arguments for one worker: its own --trials, the shared study, its slot."""
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in _OWN_FLAGS:
            skip = _OWN_FLAGS[name] if "=" not in arg else 0
            continue
        out.append(arg)
    out += ["--storage", storage, "--study", study, "--worker-slot", str(slot)]
    if trials is not None:
        out += ["--trials", str(trials)]
    return [sys.executable, LOOP, *out]


def launch(argv, n, storage, study, trials, gpus=None, log=print):
    """Start the workers and wait for them; returns the exit code (130 after Ctrl-C)."""
    places = placements(n, gpus)
    if "OMP_NUM_THREADS" in places[0]:
        log(f"{n} workers share {os.cpu_count()} CPU cores ({places[0]['OMP_NUM_THREADS']} "
            f"threads each): time-budgeted trials that share cores train fewer steps than one "
            f"worker alone, so these runs are not comparable with single-worker runs")
    procs = []
    for slot, (env, count) in enumerate(zip(places, split(trials, n))):
        if count == 0:
            continue
        procs.append(subprocess.Popen(child_argv(argv, storage, study, slot, count),
                                      env=dict(os.environ, **env), preexec_fn=die_with_parent))
    codes = []
    try:
        for p in procs:
            codes.append(p.wait())
    except KeyboardInterrupt:
        for p in procs:  # from a terminal they got the Ctrl-C too; from kill -INT, only we did
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        codes = [p.wait() for p in procs]
        return 130
    return max(codes, default=0)
