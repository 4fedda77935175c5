"""The sandbox itself: how one trial starts inside it (bubblewrap's argv, or the fallback's
train-only view of the data) and which of its rules a failed trial ran into."""
import atexit
import functools
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass

from autoresearch import config, protocol
from autoresearch.sandbox.limits import Limits, gib, tasks_of_user
from autoresearch.sandbox.reaping import TRIAL_ENV, die_with_parent, kill_marked, read_report

# What a trainer needs of a prepared dataset; everything else there (the validation split, the
# raw downloads beside it) stays out of its view.
TRAIN_FILES = ("meta.json", "tokenizer.tiktoken", "tokenizer.json", "token_bytes.npy",
               "train.bin", "train.idx.npy")
# Credentials that commonly live in a home directory; hidden from an isolated trainer.
SECRET_PATHS = ("~/.ssh", "~/.gnupg", "~/.aws", "~/.azure", "~/.config/gcloud", "~/.kube",
                "~/.docker", "~/.netrc", "~/.git-credentials", "~/.pypirc", "~/.npmrc",
                "~/.config/gh", "~/.huggingface", "~/.cache/huggingface/token",
                "~/.cache/huggingface/stored_tokens", "~/.password-store",
                "~/.local/share/keyrings")
GPU_DEVICES = ("/dev/nvidia*", "/dev/nvidia-caps", "/dev/dri", "/dev/kfd")
SUPERVISOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "supervisor.py")
SHM_BYTES = 1 << 30    # /dev/shm of an isolated trial (multiprocessing needs one)
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Launch:
    """How run_trial starts one trial: argv, env and fds for Popen, then started() right after
    Popen and finish(proc, killed) once the trial's first process has exited (killed: the loop
    ended it, on a timeout or Ctrl-C)."""
    argv: list
    env: dict
    pass_fds: tuple
    preexec: object
    started: object
    finish: object


class Sandbox:
    def __init__(self, bwrap=None, why="", limits=None, hub_cache=None):
        self.bwrap = bwrap            # path of a working bwrap, or None: the fallback
        self.why = why                # why the fallback, when it is one
        self.limits = limits if limits is not None else Limits.default()
        self.hub_cache = hub_cache    # a prefetched kernel cache to show read-only, if any
        self._views = {}

    @property
    def isolated(self):
        return self.bwrap is not None

    def describe(self):
        if self.isolated:
            return (f"sandbox: bubblewrap ({self.bwrap}): no network, read-only files except the "
                    f"trial directory and the compile cache, train split only, secrets hidden, "
                    f"own process tree; {self.limits.describe()}")
        return (f"sandbox: FALLBACK, trials are NOT isolated ({self.why}): network and files "
                f"stay reachable; only a train-only data path, a filtered environment, leftover "
                f"processes removed; {self.limits.describe()}")

    # --- one trial ----------------------------------------------------------------------------

    def launch(self, argv, trial_dir, data_dir, env):
        trial_dir = os.path.realpath(trial_dir)
        trial_id = uuid.uuid4().hex
        report_r, report_w = os.pipe()
        os.set_inheritable(report_w, True)
        env = dict(env, **{TRIAL_ENV: trial_id})
        supervised = [sys.executable, "-I", "-S", SUPERVISOR, str(report_w), "--", *argv]
        if self.isolated:
            tmp = os.path.join(trial_dir, "tmp")
            os.makedirs(tmp, exist_ok=True)
            env[config.DATA_ENV] = os.path.realpath(data_dir)
            full = self._bwrap_argv(supervised, trial_dir, env[config.DATA_ENV], env)
        else:
            tmp = None
            env[config.DATA_ENV] = self._train_view(data_dir)
            full = supervised
        limits, tasks = self.limits, tasks_of_user()

        def preexec():
            die_with_parent()
            limits.apply(tasks)

        def started():
            os.close(report_w)

        def finish(proc, killed=False):
            report = read_report(report_r)
            if not self.isolated:  # no pid namespace: the mark is how leftovers are found
                report.leftover += kill_marked(trial_id)
            elif killed:
                # The supervisor reports leftovers. But a trial killed while bwrap was starting
                # can orphan bwrap's inner process (its death signal is set once it is cloned,
                # too late if bwrap is gone by then): found by the mark, it goes unreported.
                kill_marked(trial_id)
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
            return report

        return Launch(full, env, (report_w,), preexec, started, finish)

    def _bwrap_argv(self, argv, trial_dir, data_dir, env):
        from prepare import cache_dir
        cache = os.path.realpath(cache_dir())
        compile_cache = os.path.join(cache, "compile")
        os.makedirs(compile_cache, exist_ok=True)
        env["TMPDIR"] = os.path.join(trial_dir, "tmp")
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", compile_cache)  # $HOME is read-only in here
        env.setdefault("TRITON_CACHE_DIR", os.path.join(compile_cache, "triton"))
        env.setdefault("CUDA_CACHE_PATH", os.path.join(compile_cache, "cuda"))
        env["HF_HUB_OFFLINE"] = "1"  # no network: fail fast, use the prefetched kernel
        hidden = [p for p in ("/tmp", "/run", "/var/run", cache, data_dir,
                              os.path.dirname(trial_dir))
                  if os.path.isdir(p) and not os.path.islink(p)]
        secrets = [os.path.realpath(os.path.expanduser(p)) for p in SECRET_PATHS]
        hidden += [p for p in secrets if os.path.isdir(p)]
        masks = _outermost(hidden)
        a = [self.bwrap, *base_args(self.bwrap)]
        for pattern in GPU_DEVICES:
            for dev in sorted(glob.glob(pattern)):
                a += ["--dev-bind", dev, dev]
        for m in masks:
            a += ["--tmpfs", m]
        needed = [_REPO, *[p for p in sys.path if p and os.path.isdir(p) and os.path.isabs(p)
                           and os.path.realpath(p).startswith((sys.prefix, sys.base_prefix))],
                  self.hub_cache, "/run/nvidia-persistenced"]
        needed = [os.path.realpath(p) for p in needed if p and os.path.exists(p)]
        needed = _outermost([p for p in needed + python_dirs()  # as named, and resolved
                             if any(under(p, m) for m in masks)])
        for p in needed:
            a += ["--ro-bind", p, p]
        remasked = [m for m in masks if any(under(m, p) and m != p for p in needed)]
        for m in remasked:  # a hidden place inside something shown again stays hidden
            a += ["--tmpfs", m]
        for name in TRAIN_FILES:
            path = os.path.join(data_dir, name)
            if os.path.exists(path):
                a += ["--ro-bind", path, path]
        for p in secrets:
            if os.path.isfile(p) and not any(under(p, m) for m in masks):
                a += ["--ro-bind", "/dev/null", p]
        a += ["--bind", trial_dir, trial_dir, "--bind", compile_cache, compile_cache]
        for m in masks + remasked:
            a += ["--remount-ro", m]
        return a + ["--chdir", trial_dir, "--", *argv]

    def _train_view(self, data_dir):
        """The fallback's train-only view: a directory of links to the files training needs."""
        real = os.path.realpath(data_dir)
        if real not in self._views or not os.path.isdir(self._views[real]):
            view = tempfile.mkdtemp(prefix="autoresearch-train-only-")
            atexit.register(shutil.rmtree, view, True)
            for name in TRAIN_FILES:
                if os.path.exists(os.path.join(real, name)):
                    os.symlink(os.path.join(real, name), os.path.join(view, name))
            self._views[real] = view
        return self._views[real]

    def refusal(self, exception, returncode):
        """The crash reason naming the rule a failed trial ran into, or None."""
        too_big = f"a file grew past {gib(self.limits.file_size or 0)}"
        if returncode in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ):  # a non-Python writer
            return _refused("file size", too_big)
        if not exception:
            return None
        if protocol.FILE_TOO_LARGE.search(exception):  # Python ignores SIGXFSZ
            return _refused("file size", f"{too_big}: {exception}")
        if self.isolated and protocol.READ_ONLY.search(exception):
            return _refused("read-only", exception)
        if self.isolated and protocol.NETWORK.search(exception):
            return _refused("no network", exception)
        if protocol.VAL_FILES.search(exception):
            return _refused("no validation data", exception)
        if protocol.fork_refused(exception):
            return _refused("process limit", exception)
        return None


def _refused(rule, detail):
    return protocol.refused(rule, detail[:200])


def under(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")


def _outermost(paths):
    """The paths that are not inside another one of them, outermost first."""
    out = []
    for p in sorted(set(paths), key=lambda p: (p.count("/"), p)):
        if not any(under(p, q) for q in out):
            out.append(p)
    return out


# --- bubblewrap's own arguments -------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _version(bwrap):
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10)
        return tuple(int(x) for x in re.findall(r"\d+", out.stdout)[:3])
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return ()


def base_args(bwrap):
    """Namespaces, no capabilities, a read-only root, a minimal /dev and the sandbox's own /proc;
    /dev/shm a 1777 tmpfs capped at SHM_BYTES where this bwrap can (--size came in 0.8.0,
    --perms in 0.5.0: Ubuntu 22.04 ships 0.6.1)."""
    args = ["--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net",
            "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--cap-drop", "ALL",
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    version = _version(bwrap)
    if version >= (0, 8) and not os.stat(bwrap).st_mode & 0o4000:  # setuid bwrap refuses --size
        args += ["--size", str(SHM_BYTES)]
    if version >= (0, 5):
        args += ["--perms", "1777", "--tmpfs", "/dev/shm"]
    return args


def python_dirs():
    """Where the running interpreter lives (a venv, its base installation, the executable's
    real directory): a trial needs them even when they sit in a place the sandbox hides."""
    dirs = (sys.prefix, sys.base_prefix, os.path.dirname(os.path.abspath(sys.executable)))
    return sorted({f(d) for d in dirs for f in (os.path.abspath, os.path.realpath)})
