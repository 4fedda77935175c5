"""The real downloader against a scripted hub on 127.0.0.1."""
import io
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare
from conftest import ROOT


def parquet_bytes(texts):
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=64)
    return buf.getvalue()


def shard_texts(i, n=300):
    return prepare.SyntheticProcess().sample(n, seed=100 + i)


def serve_climbmix(hub, num_shards):
    names = [f"shard_{i:05d}.parquet" for i in range(num_shards)]
    names.append(f"shard_{prepare.CLIMBMIX_VAL_SHARD:05d}.parquet")
    paths = {}
    for i, name in enumerate(names):
        paths[name] = hub.add(prepare.CLIMBMIX_REPO, name, parquet_bytes(shard_texts(i)))
    return paths


def fetch(hub, tmp_path, name="f.parquet", **kw):
    session = prepare._http_session(retries=3)
    dest = str(tmp_path / name)
    url = hub.url + f"/datasets/{prepare.CLIMBMIX_REPO}/resolve/main/{name}"
    return prepare.download_file(session, url, dest, backoff=0, **kw)


def test_climbmix_end_to_end(hub, cache):
    """Parallel download of train shards and the pinned val shard, then a full prepare."""
    paths = serve_climbmix(hub, 2)
    args = ["--profile", "smoke", "--source", "climbmix", "--num-shards", "2",
            "--hub-url", hub.url, "--workers", "3"]
    assert prepare.main(args) == 0
    raw = cache / "raw" / "climbmix"
    assert sorted(os.listdir(raw)) == sorted(paths)
    data = prepare.load_prepared()
    assert data.meta["source"]["name"] == "climbmix"
    # Train comes from shards 0 and 1, val from the pinned last shard, whole documents each.
    assert data.meta["splits"]["train"]["docs"] == 600
    assert data.meta["splits"]["val"]["docs"] == 300
    val_text = {data.tokenizer.decode(data.split("val").doc(i)[1:].tolist())
                for i in range(len(data.split("val")))}
    assert val_text == set(shard_texts(2))

    # Resumable: a second run downloads nothing (the prepared data is reused too).
    seen = len(hub.requests)
    assert prepare.main(args) == 0
    assert len(hub.requests) == seen


def test_404_is_a_clear_error(hub, tmp_path):
    with pytest.raises(prepare.PrepareError, match="not found"):
        fetch(hub, tmp_path, "missing.parquet")
    assert os.listdir(tmp_path) == []


def test_5xx_then_success(hub, tmp_path):
    body = parquet_bytes(shard_texts(0))
    path = hub.add(prepare.CLIMBMIX_REPO, "f.parquet", body)
    hub.script[path] = ["500", "500"]
    dest = fetch(hub, tmp_path)
    assert open(dest, "rb").read() == body
    assert [b for p, _, b in hub.requests] == ["500", "500", "ok"]


def test_truncated_transfer_resumes_with_range(hub, tmp_path):
    body = parquet_bytes(shard_texts(0, 2000))
    path = hub.add(prepare.CLIMBMIX_REPO, "f.parquet", body)
    hub.script[path] = ["truncate"]
    dest = fetch(hub, tmp_path)
    assert open(dest, "rb").read() == body
    (p1, r1, b1), (p2, r2, b2) = hub.requests
    assert (r1, b1) == (None, "truncate")
    # The second request asked only for what was missing (whole chunks of the first are kept).
    assert r2.startswith("bytes=") and 0 < int(r2[6:-1]) <= len(body) // 2
    assert os.listdir(tmp_path) == ["f.parquet"]


def test_corrupt_parquet_is_downloaded_again_never_kept(hub, tmp_path):
    body = parquet_bytes(shard_texts(0))
    path = hub.add(prepare.CLIMBMIX_REPO, "f.parquet", body)
    hub.script[path] = ["corrupt"]
    dest = fetch(hub, tmp_path)
    assert open(dest, "rb").read() == body
    assert [b for p, _, b in hub.requests] == ["corrupt", "ok"]


def test_always_corrupt_fails_and_leaves_nothing(hub, tmp_path):
    path = hub.add(prepare.CLIMBMIX_REPO, "f.parquet", parquet_bytes(shard_texts(0)))
    hub.script[path] = ["corrupt"] * 3
    with pytest.raises(prepare.PrepareError, match="after 3 attempts"):
        fetch(hub, tmp_path, attempts=3)
    assert os.listdir(tmp_path) == []


def test_corrupt_shard_is_never_trained_on(hub, cache):
    paths = serve_climbmix(hub, 1)
    hub.script[paths["shard_00000.parquet"]] = ["corrupt"]
    assert prepare.main(["--profile", "smoke", "--source", "climbmix", "--num-shards", "1",
                         "--hub-url", hub.url]) == 0
    data = prepare.load_prepared()
    train = data.split("train")
    texts = {data.tokenizer.decode(train.doc(i)[1:].tolist()) for i in range(len(train))}
    assert texts == set(shard_texts(0))


def test_tinystories_single_file_split_by_hash(hub, cache):
    texts = shard_texts(7, 1500)
    hub.add(prepare.TINYSTORIES_REPO, prepare.TINYSTORIES_FILE, parquet_bytes(texts))
    assert prepare.main(["--profile", "smoke", "--source", "tinystories", "--hub-url", hub.url,
                         "--val-fraction", "0.2"]) == 0
    meta = prepare.load_prepared().meta
    n_val = sum(prepare.is_val(t, 0.2) for t in texts)
    assert meta["splits"]["val"]["docs"] == n_val
    assert meta["splits"]["train"]["docs"] == len(texts) - n_val
    assert 0.1 < n_val / len(texts) < 0.3


def test_disk_full_during_download_is_clear(hub, tmp_path):
    """A real EFBIG from the kernel (file size limit) stands in for a full disk."""
    serve_climbmix(hub, 1)
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import prepare\n"
        f"sys.exit(prepare.main(['--profile', 'smoke', '--source', 'climbmix', '--num-shards',"
        f" '1', '--hub-url', {hub.url!r}, '--cache-dir', {str(tmp_path)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "disk full" in proc.stderr
    leftovers = [f for _, _, fs in os.walk(tmp_path) for f in fs]
    assert leftovers == []  # no .part, no half shard
