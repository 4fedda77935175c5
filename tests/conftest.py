import http.server
import os
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prepare  # noqa: E402


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
