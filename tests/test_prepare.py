"""Sources, tokenizer, profiles and the prepared-data layout, through the real CLI."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare
from conftest import ROOT

SMOKE = ["--profile", "smoke"]


def stories(n, seed=0):
    return prepare.SyntheticProcess().sample(n, seed=seed)


def builds_left(cache):
    return [d for d in os.listdir(cache / "prepared") if d.startswith(".build")]


# --- documents -----------------------------------------------------------------------------

def test_split_documents_is_lossless_and_prefers_top_level_cuts():
    code = "".join(f"def f{i}():\n    x = {i}\n\n    return x\n\n\n" for i in range(200))
    docs = prepare.split_documents(code, max_chars=300)
    assert "".join(docs) == code
    assert all(len(d) <= 300 for d in docs)
    assert all(d.startswith("def ") for d in docs)  # never inside a function body
    one_line = "x" * 1000 + "\n" + "y" * 10
    assert prepare.split_documents(one_line, 100) == ["x" * 1000 + "\n", "y" * 10]
    assert prepare.split_documents("  \n\n ", 100) == []


def test_val_split_is_deterministic_and_near_its_fraction():
    keys = [f"doc {i}" for i in range(20000)]
    picks = [prepare.is_val(k, 0.1) for k in keys]
    assert picks == [prepare.is_val(k, 0.1) for k in keys]
    assert 0.09 < sum(picks) / len(picks) < 0.11


@pytest.mark.slow
def test_default_run_is_offline_cpu_python(tmp_path):
    """The README's main command on this machine: no GPU, no network, no arguments."""
    env = dict(os.environ, AUTORESEARCH_CACHE=str(tmp_path), CUDA_VISIBLE_DEVICES="",
               AUTORESEARCH_HUB_URL="http://127.0.0.1:9")  # any download attempt would fail
    proc = subprocess.run([sys.executable, "prepare.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "profile: cpu (detected)" in proc.stdout
    data = prepare.load_prepared(str(tmp_path / "prepared" / open(tmp_path / "current").read().strip()))
    assert data.profile == prepare.PROFILES["cpu"]
    assert data.meta["source"]["name"] == "python"
    s = data.meta["splits"]
    assert s["train"]["tokens"] > 5 * s["val"]["tokens"] > 5 * prepare.PROFILES["cpu"].eval_tokens
    # Every evaluated row is a distinct document start: the val split is big enough.
    assert data.meta["eval"]["docs_fetched"] <= s["val"]["docs"]


def test_local_txt_jsonl_parquet(cache, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    texts = stories(900, seed=3)
    (corpus / "a.txt").write_text("\n\n".join(texts[:300]))
    with open(corpus / "sub" / "b.jsonl", "w") as f:
        for t in texts[300:600]:
            f.write(json.dumps({"text": t, "id": 1}) + "\n")
    pq.write_table(pa.table({"text": texts[600:]}), corpus / "c.parquet")
    (corpus / "ignored.csv").write_text("not text")
    assert prepare.main(SMOKE + ["--source", str(corpus)]) == 0
    data = prepare.load_prepared()
    meta = data.meta
    assert sorted(os.path.basename(f[0]) for f in meta["source"]["files"]) == ["a.txt", "b.jsonl", "c.parquet"]
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] >= 600
    # A glob names files too; same text, same dataset.
    assert prepare.main(SMOKE + ["--source", str(corpus / "**" / "*.jsonl")]) == 0
    assert prepare.load_prepared().meta["splits"]["train"]["docs"] < meta["splits"]["train"]["docs"]


def test_token_cache_round_trips_documents(smoke_data):
    enc, val = smoke_data.tokenizer, smoke_data.split("val")
    texts = stories(10, seed=99)
    for t in texts:
        ids = enc.encode_ordinary(t)
        assert enc.decode(ids) == t
        assert smoke_data.token_bytes[ids].sum() == len(t.encode())
    assert (smoke_data.token_bytes[list(enc._special_tokens.values())] == 0).all()
    assert all(val.doc(i)[0] == smoke_data.bos_token_id for i in range(len(val)))
    reloaded = prepare.load_tokenizer(smoke_data.dir)
    assert reloaded._mergeable_ranks == enc._mergeable_ranks
    assert smoke_data.meta["splits"]["val"]["tokens"] == len(val.tokens)


# --- profiles and layout -------------------------------------------------------------------

def test_detect_profile_without_accelerator():
    assert prepare.detect_profile() == "cpu"


def test_other_settings_never_mix_with_old_data(cache):
    args = SMOKE + ["--synthetic-docs", "1500"]
    assert prepare.main(args) == 0
    first = prepare.load_prepared()
    first_meta = open(os.path.join(first.dir, "meta.json")).read()
    mtime = os.path.getmtime(os.path.join(first.dir, "train.bin"))

    assert prepare.main(args + ["--vocab-size", "600"]) == 0
    second = prepare.load_prepared()
    assert second.dir != first.dir and second.vocab_size == 600
    assert open(os.path.join(first.dir, "meta.json")).read() == first_meta  # untouched

    assert prepare.main(args) == 0  # back to the first: reused, not rebuilt, current again
    assert prepare.load_prepared().dir == first.dir
    assert os.path.getmtime(os.path.join(first.dir, "train.bin")) == mtime
    assert builds_left(cache) == []


def test_pinned_dataset_and_missing_data(cache, monkeypatch, smoke_data):
    with pytest.raises(prepare.PrepareError, match="python prepare.py"):
        prepare.load_prepared()
    monkeypatch.setenv("AUTORESEARCH_DATA", smoke_data.dir)
    assert prepare.load_prepared().dir == smoke_data.dir
    monkeypatch.setenv("AUTORESEARCH_DATA", str(cache))
    with pytest.raises(prepare.PrepareError, match="not a prepared dataset"):
        prepare.load_prepared()


# --- bad input -----------------------------------------------------------------------------

def run_cli(args, capsys):
    code = prepare.main(args)
    return code, capsys.readouterr().err


def test_no_matching_files(cache, capsys, tmp_path):
    code, err = run_cli(SMOKE + ["--source", str(tmp_path / "nothing*.txt")], capsys)
    assert code == 2 and "no .txt, .jsonl or .parquet files match" in err


def test_jsonl_without_the_text_field(cache, capsys, tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no"}) + "\n")
    code, err = run_cli(SMOKE + ["--source", str(path)], capsys)
    assert code == 2 and "x.jsonl:2" in err and "'text'" in err
    assert builds_left(cache) == []


def test_parquet_without_the_text_column(cache, capsys, tmp_path):
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "x.parquet")
    code, err = run_cli(SMOKE + ["--source", str(tmp_path / "x.parquet")], capsys)
    assert code == 2 and "no column 'text'" in err and "body" in err


def test_unreadable_files(cache, capsys, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 " * 100)
    code, err = run_cli(SMOKE + ["--source", str(tmp_path / "bad.txt")], capsys)
    assert code == 2 and "cannot read" in err and "bad.txt" in err
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    code, err = run_cli(SMOKE + ["--source", str(tmp_path / "bad.parquet")], capsys)
    assert code == 2 and "cannot read" in err and "bad.parquet" in err


def test_empty_source_and_too_few_documents(cache, capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    code, err = run_cli(SMOKE + ["--source", str(tmp_path / "empty.txt")], capsys)
    assert code == 2 and "too small" in err
    # Plenty of text but a single document: nothing to hold out for validation.
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": " ".join(stories(300))}) + "\n")
    code, err = run_cli(SMOKE + ["--source", str(tmp_path / "one.jsonl")], capsys)
    assert code == 2 and "split has 1 document(s): too few" in err
    assert builds_left(cache) == [] and not (cache / "current").exists()


def test_interrupted_build_leaves_nothing(cache):
    source = prepare.synthetic_source(1000)
    real = source.documents

    def documents(split):
        yield from real(split) if split == "train" else ()
        raise KeyboardInterrupt

    source.documents = documents
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(prepare.PROFILES["smoke"], source, str(cache), log=lambda *a: None)
    assert builds_left(cache) == [] and os.listdir(cache / "prepared") == []


def test_disk_full_while_tokenizing(tmp_path):
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200000, 200000))\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import prepare\n"
        f"sys.exit(prepare.main(['--profile', 'smoke', '--cache-dir', {str(tmp_path)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "disk full" in proc.stderr
    assert os.listdir(tmp_path / "prepared") == []
