"""
prepare.py: the fixed harness every autoresearch trial shares.

One-time data preparation (run it once):

    python prepare.py                          # auto-detected profile, its default source
    python prepare.py --profile cpu            # offline: Python's own standard library as text
    python prepare.py --profile h100 --num-shards 10
    python prepare.py --source synthetic       # a process with a known floor on val_bpb
    python prepare.py --source 'corpus/*.jsonl'

and the runtime utilities train.py imports (nothing here is meant to be edited by the loop):

    from prepare import load_prepared
    data = load_prepared()                     # profile, tokenizer, token cache
    loader = data.make_dataloader("train", batch_size, device)
    val_bpb = data.evaluate_bpb(model, batch_size)

Read top to bottom: the profiles (the constants that make runs comparable), then the fixed
metric (val_bpb: FixedEval and the trainer's side of it; fixed, do not change), then where data
lives, the text sources, the tokenizer, the token cache, the dataloader, preparing a dataset,
the runtime object train.py gets (Prepared) and the command line.

Everything lives under the cache directory (~/.cache/autoresearch, or $AUTORESEARCH_CACHE):

    raw/<source>/...            downloaded parquet files (validated, never half-written)
    prepared/<name>/            one prepared dataset: meta.json, tokenizer, token arrays
    current                     the name of the dataset train.py uses by default

A prepared dataset is named after a hash of everything that shaped it (profile, source, vocab
size, split), so preparing with other settings builds a new directory beside the old one instead
of mixing with it. $AUTORESEARCH_DATA pins a prepared directory explicitly.
"""

import argparse
import base64
import bisect
import collections
import errno
import glob
import hashlib
import json
import math
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
import tokenize
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field

import numpy as np

try:
    import torch
except ImportError:  # the public Colab tutorial's failure mode: say it, don't limp on
    sys.exit("prepare.py needs PyTorch: pip install torch==2.13.0 (on Colab it is preinstalled)")

FORMAT_VERSION = 1  # bump when the on-disk layout or the way text becomes tokens changes


class PrepareError(Exception):
    """A problem the user can fix; the CLI prints it without a traceback."""


# ---------------------------------------------------------------------------
# Profiles: the constants that make runs comparable
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    name: str
    max_seq_len: int     # MAX_SEQ_LEN: context length of training and evaluation
    time_budget: float   # TIME_BUDGET: seconds of training per trial
    eval_tokens: int     # EVAL_TOKENS: size of the fixed validation subset
    vocab_size: int      # VOCAB_SIZE: BPE vocabulary, special tokens included
    source: str          # default data source
    # Defaults for train.py's constants block (train.py falls back to these).
    train: dict = field(default_factory=dict, compare=False)


# Karpathy's train.py constants: the h100 defaults, and the base the smaller profiles adjust.
KARPATHY = dict(
    ASPECT_RATIO=64, HEAD_DIM=128, WINDOW_PATTERN="SSSL", TOTAL_BATCH_SIZE=2**19,
    EMBEDDING_LR=0.6, UNEMBEDDING_LR=0.004, MATRIX_LR=0.04, SCALAR_LR=0.5, WEIGHT_DECAY=0.2,
    ADAM_BETAS=(0.8, 0.95), WARMUP_RATIO=0.0, WARMDOWN_RATIO=0.5, FINAL_LR_FRAC=0.0, DEPTH=8,
    DEVICE_BATCH_SIZE=128)

PROFILES = {
    # Karpathy's autoresearch exactly, so numbers compare with the published ones.
    "h100": Profile("h100", 2048, 300, 40 * 524288, 8192, "climbmix", train=KARPATHY),
    # A free Colab T4 (16 GB, fp16 only) in the same 5 minutes, on low-entropy stories.
    "colab": Profile("colab", 512, 300, 2**20, 4096, "tinystories", train=KARPATHY | dict(
        HEAD_DIM=64, WINDOW_PATTERN="L", TOTAL_BATCH_SIZE=2**16, DEPTH=6, DEVICE_BATCH_SIZE=64)),
    # Two CPU cores, one minute, offline. A small vocabulary keeps the output layer, which
    # dominates a CPU step, cheap (BENCHMARKS.md: 2048 beat 1024 and 4096 here).
    "cpu": Profile("cpu", 256, 60, 2**16, 2048, "python", train=KARPATHY | dict(
        HEAD_DIM=64, WINDOW_PATTERN="L", TOTAL_BATCH_SIZE=2**12, DEPTH=2, DEVICE_BATCH_SIZE=16)),
    # Seconds-long runs for tests and CI; numbers mean nothing beyond "it works".
    "smoke": Profile("smoke", 128, 5, 8192, 512, "synthetic", train=KARPATHY | dict(
        ASPECT_RATIO=32, HEAD_DIM=32, WINDOW_PATTERN="L", TOTAL_BATCH_SIZE=2**11, DEPTH=2,
        DEVICE_BATCH_SIZE=16)),
}


def detect_profile():
    """The profile the hardware can honour: an 80 GB-class recent GPU runs Karpathy's h100
    constants, any smaller accelerator the colab ones, everything else the cpu ones."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        if props.major >= 9 and props.total_memory >= 70 * 2**30:
            return "h100"
        return "colab"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "colab"
    return "cpu"


# ---------------------------------------------------------------------------
# THE FIXED METRIC: val_bpb. Fixed: do not change. Trials are compared by it; nothing a trial
# runs may change it. (Prepared.evaluate_bpb, below, is how train.py calls it.)
# ---------------------------------------------------------------------------
#
# Bits per byte on the first EVAL_TOKENS // MAX_SEQ_LEN packed rows of the validation split: the
# per-token cross-entropy (nats) of every target that is not a special token, summed, divided by
# the bytes those targets stand for, converted to bits. The model only maps inputs to logits; the
# loss is computed here. Two checks ride on one extra batch, a copy of the first:
#   causality:     rows 0 and 1 get other inputs after a random position p, the same targets;
#                  the loss up to p must not move (a model that peeks ahead scores wonderfully
#                  and means nothing);
#   statelessness: the other rows repeat the first batch exactly and must score exactly as before
#                  (a model that learns from the validation rows while being scored fails).
# Standalone (`python train.py`) all of it runs in the trainer. Under the loop, FixedEval lives in
# the loop's process, which holds the validation rows; the trainer's evaluate_bpb connects to it
# over an inherited socket ($AUTORESEARCH_EVAL_FD), receives inputs and targets batch by batch,
# answers per-token losses, and is told val_bpb. Messages are small JSON headers and raw numpy
# bytes (never pickle: the loop must not unpickle what a trial sends), and everything received
# is checked. A model that fails a check is never scored: ContractError.


def eval_rows(profile):
    """The validation subset is the first EVAL_TOKENS // MAX_SEQ_LEN packed rows, whatever the
    batch size, so changing DEVICE_BATCH_SIZE never changes the metric."""
    return max(1, profile.eval_tokens // profile.max_seq_len)


EVAL_FD_ENV = "AUTORESEARCH_EVAL_FD"
# Loss changes a check tolerates, in nats (|a - b| <= tol * (1 + |b|)). Honest models give
# exactly equal losses on CPU in fp32 and bf16 (same shapes, same kernels); a non-causal
# attention trained for 5 smoke steps moves them by 0.01, after 30 steps by about 1.
CHECK_TOLERANCE = 1e-3


class ContractError(Exception):
    """The model or the trainer broke the fixed metric's contract; the trial is not scored."""


class FixedEval:
    """The fixed evaluation of one prepared dataset: its rows, the metric and the checks."""

    def __init__(self, data):
        self.seq_len = data.profile.max_seq_len
        self.token_bytes = data.token_bytes.astype(np.int64)
        rows, _ = next(pack_batches(data.split("val"), eval_rows(data.profile), self.seq_len))
        self.rows = rows.astype(token_dtype(data.vocab_size))  # (rows, seq_len + 1), compact

    def run(self, score, batch_size):
        """val_bpb, with score(x, y) -> per-token nats (n, T) for int64 inputs and targets."""
        if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
            raise ContractError(f"batch size must be a positive integer, not {batch_size!r}")
        total_nats, total_bytes, first = 0.0, 0, None
        for start in range(0, len(self.rows), batch_size):
            rows = self.rows[start:start + batch_size].astype(np.int64)
            x, y = rows[:, :-1], rows[:, 1:]
            nats = self._checked(score(x, y), x.shape)
            nbytes = self.token_bytes[y]
            total_nats += float(nats[nbytes > 0].sum(dtype=np.float64))
            total_bytes += int(nbytes.sum())
            if first is None:
                first = rows, nats
        val_bpb = total_nats / (math.log(2) * total_bytes)
        if math.isfinite(val_bpb):  # a diverged model fails as nan; no need to check it
            self._check(score, *first)
        return val_bpb

    @staticmethod
    def _checked(nats, shape):
        nats = np.asarray(nats)
        if nats.shape != shape or nats.dtype.kind != "f":
            raise ContractError(f"protocol: expected float losses of shape {shape}, got "
                                f"{nats.dtype} {nats.shape}")
        if (nats < 0).any():  # a cross-entropy is never negative
            raise ContractError("protocol: a negative loss")
        return nats

    def _check(self, score, rows, nats):
        """Causality and statelessness, on one more batch the size of the first."""
        n, T = nats.shape
        x, y = rows[:, :-1], rows[:, 1:]
        # Inputs after a random position p (unknown in advance) change in rows 0 and 1; targets
        # do not, so the loss at every position up to p must not move. The input right after p
        # always changes: a model that peeks one token ahead reads exactly that one.
        p = int(np.random.default_rng().integers(T // 4, 3 * T // 4 + 1))
        changed = min(2, n)
        got = self._checked(score(self.probe(x, p, changed), y), (n, T))
        if n >= 3:  # the unchanged rows of the probe are the repeats
            repeated, expected = got[changed:], nats[changed:]
        else:       # too few rows to share one batch: the repeats come in a batch of their own
            repeated, expected = self._checked(score(x.copy(), y.copy()), (n, T)), nats
        self._compare(repeated, expected, "stateful: rows scored a second time got other "
                      "losses (the model changed while it was evaluated)")
        self._compare(got[:changed, :p + 1], nats[:changed, :p + 1], "non-causal: the loss at "
                      f"positions up to {p} changed when only the inputs after them did")

    def probe(self, x, p, changed):
        """x with the inputs after position p replaced in its first `changed` rows."""
        n, T = x.shape
        probe = x.copy()
        for i in range(changed):  # tokens from the last rows (or, with one row, shifted)
            donor = len(self.rows) - 1 - i
            tail = self.rows[donor, :-1].astype(np.int64) if donor >= n else np.roll(x[i], T // 2)
            probe[i, p + 1:] = tail[p + 1:]
            if probe[i, p + 1] == x[i, p + 1]:
                probe[i, p + 1] = (x[i, p + 1] + 1) % len(self.token_bytes)
        return probe

    @staticmethod
    def _compare(got, expected, message):
        off = ~np.isclose(got, expected, rtol=CHECK_TOLERANCE, atol=CHECK_TOLERANCE,
                          equal_nan=True)
        if off.any():
            gap = np.abs(got - expected)[off]
            worst = float(np.where(np.isnan(gap), np.inf, gap).max())  # nan against a number: inf
            raise ContractError(f"{message} (by up to {worst:.3g} nats)")

    def serve(self, conn):
        """The loop's side of the evaluation, over a multiprocessing Connection to a trainer.
        Returns {"val_bpb": x}, {"error": reason}, or None if the trainer went away first."""
        wire = self.rows.dtype.str
        try:
            hello = _json_message(conn.recv_bytes(1024))
            size = hello.get("batch_size") if isinstance(hello, dict) else None
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ContractError(f"protocol: the first message must be a batch size, not "
                                    f"{str(hello)[:100]}")

            def score(x, y):
                conn.send_bytes(json.dumps({"shape": list(x.shape), "dtype": wire}).encode())
                conn.send_bytes(x.astype(wire).tobytes())
                conn.send_bytes(y.astype(wire).tobytes())
                expected = x.size * 4
                try:
                    raw = conn.recv_bytes(expected)
                except OSError:  # longer than asked for
                    raise ContractError(f"protocol: an answer longer than {expected} "
                                        f"bytes") from None
                if len(raw) != expected:
                    raise ContractError(f"protocol: {len(raw)} bytes of losses, not {expected}")
                return np.frombuffer(raw, dtype="<f4").reshape(x.shape)

            result = {"val_bpb": self.run(score, min(size, len(self.rows)))}
        except ContractError as e:
            result = {"error": str(e)}
        except (EOFError, OSError):
            return None
        try:
            conn.send_bytes(json.dumps(result).encode())
        except OSError:
            pass
        return result


def _json_message(raw):
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ContractError("protocol: a message that is not JSON") from None


def model_scorer(model):
    """score(x, y) for FixedEval: the model's logits for x, the cross-entropy computed here."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def score(x, y):
        was_training = model.training
        model.eval()
        try:
            logits = model(torch.from_numpy(x).to(device))
        finally:
            model.train(was_training)
        if not (isinstance(logits, torch.Tensor) and logits.dim() == 3
                and tuple(logits.shape[:2]) == x.shape):
            raise ContractError(f"model(inputs) must return logits of shape (B, T, vocab), got "
                                f"{getattr(logits, 'shape', type(logits).__name__)}")
        targets = torch.from_numpy(y).to(device)
        nats = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                 reduction="none")
        return nats.view(x.shape).cpu().numpy()

    return score


_remote_done = False


def evaluate_remotely(fd, score, batch_size):
    """The trainer's side of the evaluation: answer the loop's batches over the inherited
    socket `fd`, once per run."""
    global _remote_done
    from multiprocessing.connection import Connection
    if _remote_done:
        raise ContractError("the fixed evaluation runs once per trial")
    _remote_done = True
    conn = Connection(fd)
    try:
        conn.send_bytes(json.dumps({"batch_size": int(batch_size)}).encode())
        while True:
            msg = json.loads(conn.recv_bytes())
            if "shape" not in msg:
                break
            shape, dtype = tuple(msg["shape"]), np.dtype(msg["dtype"])
            x = np.frombuffer(conn.recv_bytes(), dtype).reshape(shape).astype(np.int64)
            y = np.frombuffer(conn.recv_bytes(), dtype).reshape(shape).astype(np.int64)
            conn.send_bytes(np.ascontiguousarray(score(x, y), dtype="<f4").tobytes())
    finally:
        conn.close()
    if "error" in msg:
        raise ContractError(msg["error"])
    return float(msg["val_bpb"])


# ---------------------------------------------------------------------------
# Locations
# ---------------------------------------------------------------------------

def cache_dir(path=None):
    return os.path.abspath(path or os.environ.get("AUTORESEARCH_CACHE")
                           or os.path.join(os.path.expanduser("~"), ".cache", "autoresearch"))


DEFAULT_HUB_URL = "https://huggingface.co"


def hub_url(url=None):
    """Base URL of the dataset hub; tests point it at a server on 127.0.0.1."""
    return (url or os.environ.get("AUTORESEARCH_HUB_URL") or DEFAULT_HUB_URL).rstrip("/")


# ---------------------------------------------------------------------------
# Text sources: each yields documents (str) for the "train" and "val" splits
# ---------------------------------------------------------------------------

DOC_CHARS = 2000        # .txt files and Python modules are cut into documents of about this size
VAL_FRACTION = 0.05     # share of documents (or files) held out where a source has no val split

# Where a long text may be cut, best first: before an unindented line that follows a blank line
# (a paragraph in prose, a top-level definition in code), after any blank line, after any line.
_CUT_POINTS = (re.compile(r"\n[ \t]*\n(?=\S)"), re.compile(r"\n[ \t]*\n"), re.compile(r"\n"))


def split_documents(text, max_chars=DOC_CHARS):
    """Cut text into documents of at most max_chars (where the text allows), at the best cut
    points available. Nothing is lost: the documents concatenate back to the text."""
    if len(text) <= max_chars:
        return [text] if text.strip() else []
    cuts = [[m.end() for m in p.finditer(text)] for p in _CUT_POINTS]
    docs, start = [], 0
    while len(text) - start > max_chars:
        end = None
        for points in cuts:
            i = bisect.bisect_right(points, start + max_chars) - 1
            if i >= 0 and points[i] > start:
                end = points[i]
                break
        if end is None:  # one line longer than max_chars: keep it whole
            i = bisect.bisect_right(cuts[-1], start)
            end = cuts[-1][i] if i < len(cuts[-1]) else len(text)
        docs.append(text[start:end])
        start = end
    docs.append(text[start:])
    return [d for d in docs if d.strip()]


def is_val(key, fraction):
    """Deterministic, order-independent split: hash the key (a path or the text itself)."""
    if isinstance(key, str):
        key = key.encode("utf-8", "surrogatepass")
    return zlib.crc32(key) < fraction * 2**32


@dataclass
class Source:
    name: str               # what meta.json and the dataset name call it
    fingerprint: dict       # everything that identifies the text; hashed into the dataset id
    documents: object       # documents(split) -> iterator of str
    shuffle: bool = True    # False where the source comes shuffled already (climbmix)
    process: object = None  # the SyntheticProcess behind the text, when it is known


# --- python: the running interpreter's standard library -------------------------------------

def python_source(val_fraction=0.1):  # by module: a larger share keeps eval rows distinct
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "**", "*.py"),
                                                               recursive=True)
                   if "site-packages" not in p and "dist-packages" not in p)
    if not files:
        raise PrepareError(f"no Python source files under {root}")

    def documents(split):
        for rel in files:
            if is_val(rel, val_fraction) != (split == "val"):
                continue
            try:
                with tokenize.open(os.path.join(root, rel)) as f:  # honours coding: cookies
                    text = f.read()
            except (OSError, SyntaxError, UnicodeDecodeError):
                continue  # a handful of test fixtures are deliberately undecodable
            yield from split_documents(text)

    fp = {"python": sys.version.split()[0], "stdlib": root, "files": len(files),
          "val_fraction": val_fraction, "doc_chars": DOC_CHARS}
    return Source("python", fp, documents)


# --- synthetic: text whose exact probability we know -----------------------------------------

class SyntheticProcess:
    """A word-level Markov chain. Each document is a run of words, each followed by a space, so
    a byte string decodes to exactly one word sequence and its probability is exact. The next
    word is one of the previous word's few favourite successors with probability `stick`,
    otherwise a draw from a Zipf unigram distribution. Documents have a random length drawn
    independently of their content."""

    def __init__(self, seed=1337, num_words=384, successors=4, stick=0.75, min_words=16,
                 max_words=256):
        rng = np.random.default_rng(seed)
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        words = set()
        while len(words) < num_words:
            words.add("".join(rng.choice(letters, size=int(rng.integers(1, 8)))))
        self.words = sorted(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        ranks = rng.permutation(num_words)
        unigram = 1.0 / (ranks + 2.7) ** 1.1
        self.unigram = unigram / unigram.sum()
        self.succ = rng.choice(num_words, size=(num_words, successors), p=self.unigram)
        self.stick, self.min_words, self.max_words = stick, min_words, max_words
        self.params = dict(seed=seed, num_words=num_words, successors=successors, stick=stick,
                           min_words=min_words, max_words=max_words)
        # Dense transition matrix, only for scoring: P[prev, next].
        counts = np.zeros((num_words, num_words))
        np.add.at(counts, (np.repeat(np.arange(num_words), successors), self.succ.ravel()), 1)
        self.P = stick * counts / successors + (1 - stick) * self.unigram[None, :]

    def sample(self, num_docs, seed):
        """num_docs documents, generated all at once, one word position at a time."""
        rng = np.random.default_rng(seed)
        lengths = rng.integers(self.min_words, self.max_words + 1, size=num_docs)
        cdf = np.cumsum(self.unigram)
        seqs = np.zeros((num_docs, self.max_words), dtype=np.int64)
        prev = np.minimum(np.searchsorted(cdf, rng.random(num_docs)), len(cdf) - 1)
        seqs[:, 0] = prev
        k = self.succ.shape[1]
        for t in range(1, self.max_words):
            stick = rng.random(num_docs) < self.stick
            fav = self.succ[prev, rng.integers(0, k, size=num_docs)]
            fresh = np.minimum(np.searchsorted(cdf, rng.random(num_docs)), len(cdf) - 1)
            prev = np.where(stick, fav, fresh)
            seqs[:, t] = prev
        words = self.words
        return ["".join(words[w] + " " for w in seqs[i, :lengths[i]]) for i in range(num_docs)]

    def prefix_bits(self, text):
        """-log2 P(the document starts with `text`), exactly, also for a cut-off last word."""
        *complete, partial = text.split(" ")
        bits, prev = 0.0, None
        for w in complete:
            i = self.index[w]
            p = self.unigram[i] if prev is None else self.P[prev, i]
            bits -= math.log2(p)
            prev = i
        if partial:
            dist = self.unigram if prev is None else self.P[prev]
            bits -= math.log2(sum(dist[i] for w, i in self.index.items() if w.startswith(partial)))
        return bits


def synthetic_source(num_docs=20000, seed=1337):
    process = SyntheticProcess(seed=seed)
    num_val = max(num_docs // 10, 1)

    def documents(split):
        n, s = (num_docs, seed + 1) if split == "train" else (num_val, seed + 2)
        yield from process.sample(n, s)

    fp = {"process": process.params, "train_docs": num_docs, "val_docs": num_val}
    return Source("synthetic", fp, documents, process=process)


# --- local files: .txt, .jsonl, .parquet -----------------------------------------------------

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def read_documents(path, text_key="text"):
    """Documents of one local file. Errors name the file."""
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq
            pf = pq.ParquetFile(path)
            if text_key not in pf.schema_arrow.names:
                raise PrepareError(f"{path}: no column {text_key!r} (columns: "
                                   f"{', '.join(pf.schema_arrow.names)}); use --text-key")
            for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
                yield from (t for t in batch.column(0).to_pylist() if t)
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[text_key]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise PrepareError(f"{path}:{lineno}: expected a JSON object with a "
                                           f"{text_key!r} field ({e.__class__.__name__})") from None
                    if text:
                        yield text
        else:
            with open(path, encoding="utf-8") as f:
                yield from split_documents(f.read())
    except PrepareError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise PrepareError(f"cannot read {path}: {e}") from None
    except Exception as e:  # pyarrow raises its own types for damaged files
        raise PrepareError(f"cannot read {path}: {e.__class__.__name__}: {e}") from None


def local_source(pattern, text_key="text", val_fraction=VAL_FRACTION):
    if os.path.isdir(pattern):
        paths = glob.glob(os.path.join(pattern, "**", "*"), recursive=True)
    else:
        paths = glob.glob(os.path.expanduser(pattern), recursive=True)
    paths = sorted(os.path.abspath(p) for p in paths if p.endswith(TEXT_SUFFIXES)
                   and os.path.isfile(p))
    if not paths:
        raise PrepareError(f"no .txt, .jsonl or .parquet files match {pattern!r} (known sources: "
                           f"{', '.join(SOURCES)})")

    def documents(split):
        want_val = split == "val"
        for path in paths:
            for doc in read_documents(path, text_key):
                if is_val(doc, val_fraction) == want_val:
                    yield doc

    fp = {"files": [[p, os.path.getsize(p), int(os.path.getmtime(p))] for p in paths],
          "text_key": text_key, "val_fraction": val_fraction, "doc_chars": DOC_CHARS}
    return Source("local", fp, documents)


# --- remote parquet on the Hugging Face hub --------------------------------------------------

CLIMBMIX_REPO = "karpathy/climbmix-400b-shuffle"
CLIMBMIX_LAST_SHARD = 6542           # shard_06542.parquet is the last one...
CLIMBMIX_VAL_SHARD = CLIMBMIX_LAST_SHARD  # ...and pinned as validation, as in Karpathy's
TINYSTORIES_REPO = "karpathy/tinystories-gpt4-clean"
TINYSTORIES_FILE = "tinystories_gpt4_clean.parquet"


def check_parquet(path, column="text"):
    """Read the whole text column: a damaged or truncated file fails here, not in training."""
    import pyarrow.parquet as pq
    table = pq.read_table(path, columns=[column])
    if table.num_rows == 0:
        raise ValueError("no rows")
    return table.num_rows


def _http_session(retries):
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry
    retry = Retry(total=retries, connect=retries, read=retries, status=retries,
                  backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504),
                  allowed_methods=frozenset({"GET"}), respect_retry_after_header=True,
                  raise_on_status=False)
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=retry))
    session.mount("https://", HTTPAdapter(max_retries=retry))
    return session


_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _disk_full(e, path):
    return PrepareError(f"disk full while writing {path} ({os.strerror(e.errno)}); free some "
                        f"space or point AUTORESEARCH_CACHE elsewhere, then run prepare again")


def download_file(session, url, dest, attempts=5, backoff=1.0, progress=None, timeout=60):
    """Fetch url to dest: stream into dest.part (resumed with a Range request when a previous
    try left one), check it is a readable parquet file, then rename atomically. Status-level
    retries (429/5xx) happen inside the session; truncated or corrupt transfers retry here."""
    import requests
    part = dest + ".part"
    last = None
    for attempt in range(1, attempts + 1):
        try:
            have = os.path.getsize(part) if os.path.exists(part) else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            with session.get(url, stream=True, timeout=timeout, headers=headers) as r:
                if r.status_code == 404:
                    raise PrepareError(f"not found: {url} (check --hub-url and the file name)")
                if r.status_code == 416:  # our partial file is already complete or bogus
                    os.remove(part)
                    continue
                r.raise_for_status()
                mode = "ab" if (have and r.status_code == 206) else "wb"
                if mode == "wb" and progress is not None and have:
                    progress.update(-have)
                with open(part, mode) as f:
                    for chunk in r.iter_content(chunk_size=1 << 16):
                        f.write(chunk)
                        if progress is not None:
                            progress.update(len(chunk))
            check_parquet(part)
            os.replace(part, dest)
            return dest
        except PrepareError:
            raise
        except OSError as e:
            if e.errno in _DISK_FULL:
                _remove(part)
                raise _disk_full(e, part) from None
            last = e  # connection dropped mid-transfer: keep the part, resume it
        except requests.RequestException as e:
            last = e
        except Exception as e:  # parquet check failed: the bytes are wrong, start over
            last = e
            _remove(part)
        if attempt < attempts:
            time.sleep(backoff * 2 ** (attempt - 1))
    _remove(part)
    raise PrepareError(f"download failed after {attempts} attempts: {url}: {last}")


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def download_files(files, dest_dir, base_url=None, workers=8, attempts=5, backoff=1.0,
                   retries=5):
    """Download [(repo, path_in_repo)] in parallel into dest_dir; files already there (and
    complete: only whole, checked files ever get their final name) are skipped."""
    from tqdm.auto import tqdm
    os.makedirs(dest_dir, exist_ok=True)
    base = hub_url(base_url)
    todo = [(f"{base}/datasets/{repo}/resolve/main/{name}", os.path.join(dest_dir, name))
            for repo, name in files]
    todo = [(u, d) for u, d in todo if not os.path.exists(d)]
    if not todo:
        return
    session = _http_session(retries)
    progress = tqdm(total=0, unit="B", unit_scale=True, desc=f"download {len(todo)} file(s)")
    lock = threading.Lock()

    class Counter:  # tqdm's update is not meant to be called from many threads at once
        def update(self, n):
            with lock:
                progress.update(n)

    counter = Counter()
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
            futures = [pool.submit(download_file, session, u, d, attempts, backoff, counter)
                       for u, d in todo]
            for fut in as_completed(futures):
                fut.result()
    finally:
        progress.close()


def climbmix_source(num_shards=10, base_url=None, workers=8, raw_dir=None):
    if not 1 <= num_shards <= CLIMBMIX_LAST_SHARD:
        raise PrepareError(f"--num-shards must be between 1 and {CLIMBMIX_LAST_SHARD}")
    names = [f"shard_{i:05d}.parquet" for i in range(num_shards)]
    val_name = f"shard_{CLIMBMIX_VAL_SHARD:05d}.parquet"
    download_files([(CLIMBMIX_REPO, n) for n in names + [val_name]], raw_dir, base_url, workers)

    def documents(split):
        for name in (names if split == "train" else [val_name]):
            yield from read_documents(os.path.join(raw_dir, name))

    fp = {"repo": CLIMBMIX_REPO, "train_shards": num_shards, "val_shard": val_name}
    return Source("climbmix", fp, documents, shuffle=False)


def tinystories_source(base_url=None, workers=8, raw_dir=None, val_fraction=VAL_FRACTION):
    download_files([(TINYSTORIES_REPO, TINYSTORIES_FILE)], raw_dir, base_url, workers)
    path = os.path.join(raw_dir, TINYSTORIES_FILE)

    def documents(split):
        want_val = split == "val"
        yield from (d for d in read_documents(path) if is_val(d, val_fraction) == want_val)

    fp = {"repo": TINYSTORIES_REPO, "file": TINYSTORIES_FILE, "bytes": os.path.getsize(path),
          "val_fraction": val_fraction}
    return Source("tinystories", fp, documents)


SOURCES = ("climbmix", "tinystories", "python", "synthetic")


def resolve_source(spec, args, root):
    raw = os.path.join(root, "raw", spec)
    if spec == "python":
        return python_source(args.val_fraction or 0.1)
    if spec == "synthetic":
        return synthetic_source(args.synthetic_docs)
    if spec == "climbmix":
        return climbmix_source(args.num_shards, args.hub_url, args.workers, raw)
    if spec == "tinystories":
        return tinystories_source(args.hub_url, args.workers, raw, args.val_fraction or VAL_FRACTION)
    return local_source(spec, args.text_key, args.val_fraction or VAL_FRACTION)


# ---------------------------------------------------------------------------
# Tokenizer: BPE trained with rustbpe, used through tiktoken
# ---------------------------------------------------------------------------

# GPT-4's split pattern, with numbers split into groups of at most two digits.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}|"""
                 r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
BOS = "<|bos|>"
SPECIAL_TOKENS = [BOS, "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>"]
TOKENIZER_DOC_CHARS = 10_000  # long documents contribute only their start to BPE training


def train_tokenizer(texts, vocab_size):
    import rustbpe
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts, vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
    return make_encoding(ranks, bpe.get_pattern())


def make_encoding(ranks, pattern):
    import tiktoken
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="autoresearch", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens=specials)


def save_tokenizer(enc, directory):
    """tiktoken's own text format (base64 token, rank), plus the split pattern."""
    ranks = enc._mergeable_ranks
    with open(os.path.join(directory, "tokenizer.tiktoken"), "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    with open(os.path.join(directory, "tokenizer.json"), "w") as f:
        json.dump({"pattern": enc._pat_str, "special_tokens": enc._special_tokens}, f, indent=1)
    np.save(os.path.join(directory, "token_bytes.npy"), token_byte_lengths(enc))


def load_tokenizer(directory):
    ranks = {}
    with open(os.path.join(directory, "tokenizer.tiktoken"), "rb") as f:
        for line in f:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    with open(os.path.join(directory, "tokenizer.json")) as f:
        spec = json.load(f)
    return make_encoding(ranks, spec["pattern"])


def token_byte_lengths(enc):
    """Bytes each token stands for; 0 for special tokens, which the metric leaves out."""
    special = set(enc._special_tokens.values())
    return np.array([0 if i in special else len(enc.decode_single_token_bytes(i))
                     for i in range(enc.n_vocab)], dtype=np.int32)


def check_round_trip(enc, samples):
    for text in samples:
        if enc.decode(enc.encode_ordinary(text)) != text:
            raise PrepareError(f"tokenizer round trip failed on {text[:60]!r}")


# ---------------------------------------------------------------------------
# Token cache: each split as one flat token array on disk, documents delimited by offsets
# ---------------------------------------------------------------------------

def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_split(docs, enc, directory, split, shuffle_seed=None, batch_docs=512, desc=None):
    """Tokenize documents once: <split>.bin holds [BOS, doc tokens...] for every document,
    <split>.idx.npy the document start offsets (plus the end). Returns the split's stats."""
    from tqdm.auto import tqdm
    bos = enc.encode_single_token(BOS)
    dtype = token_dtype(enc.n_vocab)
    raw_path = os.path.join(directory, f"{split}.unshuffled" if shuffle_seed is not None
                            else f"{split}.bin")
    lengths, num_bytes = [], 0
    threads = max(1, os.cpu_count() or 1)
    with open(raw_path, "wb") as out, tqdm(desc=desc or f"tokenize {split}", unit=" docs") as bar:
        batch = []

        def flush():
            nonlocal num_bytes
            encoded = enc.encode_ordinary_batch(batch, num_threads=threads)
            sizes = [len(ids) + 1 for ids in encoded]
            flat = []
            for ids in encoded:
                flat.append(bos)
                flat.extend(ids)
            out.write(np.array(flat, dtype=dtype).tobytes())  # tofile hides errno (disk full)
            lengths.extend(sizes)
            num_bytes += sum(len(t.encode("utf-8", "surrogatepass")) for t in batch)
            bar.update(len(batch))
            batch.clear()

        for doc in docs:
            batch.append(doc)
            if len(batch) >= batch_docs:
                flush()
        if batch:
            flush()
    lengths = np.array(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if shuffle_seed is not None and len(lengths):
        # Whole documents in a seeded random order: the loader then streams front to back.
        src = np.memmap(raw_path, dtype=dtype, mode="r")
        order = np.random.default_rng(shuffle_seed).permutation(len(lengths))
        with open(os.path.join(directory, f"{split}.bin"), "wb") as out:
            for i in order:
                out.write(src[offsets[i]:offsets[i + 1]].tobytes())
        del src
        os.remove(raw_path)
        lengths = lengths[order]
        np.cumsum(lengths, out=offsets[1:])
    np.save(os.path.join(directory, f"{split}.idx.npy"), offsets)
    return {"docs": int(len(lengths)), "tokens": int(offsets[-1]), "bytes": int(num_bytes)}


class TokenSplit:
    """One split of the token cache, memory-mapped."""

    def __init__(self, directory, split, vocab_size):
        path = os.path.join(directory, f"{split}.bin")
        # np.asarray drops the memmap subclass: slicing a plain ndarray is several times faster.
        self.tokens = np.asarray(np.memmap(path, dtype=token_dtype(vocab_size), mode="r"))
        self.offsets = np.load(os.path.join(directory, f"{split}.idx.npy"))
        self.lengths = np.diff(self.offsets)

    def __len__(self):
        return len(self.lengths)

    def doc(self, i):
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


# ---------------------------------------------------------------------------
# Dataloader: BOS-aligned best-fit packing
# ---------------------------------------------------------------------------

class BestFitPacker:
    """Plans rows of exactly row_len tokens from documents streamed in order (cycling, one epoch
    per pass). A buffer of the next buffer_size documents is kept full; each row takes the
    largest buffered document that still fits, and when none fits it crops the shortest one to
    fill the row, so there is no padding and every row starts at a document's BOS. Among equal
    lengths the document that entered the buffer first wins.

    The buffer is kept as distinct lengths in a sorted list plus a FIFO of documents per length:
    a best fit is a bisect, not a scan. tests/test_dataloader.py holds the scanning version and
    checks both give the same rows."""

    def __init__(self, lengths, row_len, buffer_size=1000):
        if len(lengths) == 0:
            raise PrepareError("cannot pack rows from an empty split")
        self.lengths = [int(n) for n in lengths]
        self.row_len = row_len
        self.buffer_size = min(buffer_size, len(self.lengths))
        self.fetched = 0          # documents taken from the stream so far
        self.epoch = 1            # epoch of the last document fetched
        self.queues = {}          # length -> deque of document indices, in arrival order
        self.sizes = []           # distinct lengths in the buffer, sorted
        self.buffered = 0

    def _fill(self):
        n, lengths, queues = len(self.lengths), self.lengths, self.queues
        while self.buffered < self.buffer_size:
            doc = self.fetched % n
            self.epoch = self.fetched // n + 1
            self.fetched += 1
            size = lengths[doc]
            q = queues.get(size)
            if q is None:
                q = queues[size] = collections.deque()
                bisect.insort(self.sizes, size)
            q.append(doc)
            self.buffered += 1

    def _take(self, i):
        size = self.sizes[i]
        q = self.queues[size]
        doc = q.popleft()
        if not q:
            del self.queues[size]
            del self.sizes[i]
        self.buffered -= 1
        return doc

    def next_row(self):
        """[(document index, tokens taken from its start), ...] summing to row_len."""
        row, remaining = [], self.row_len
        while remaining:
            self._fill()
            i = bisect.bisect_right(self.sizes, remaining) - 1
            if i >= 0:
                take = self.sizes[i]
                row.append((self._take(i), take))
            else:
                take = remaining
                row.append((self._take(0), take))
            remaining -= take
        return row


def pack_batches(split, batch_size, seq_len, buffer_size=1000):
    """Yields (rows, epoch): rows is a fresh int64 array (batch_size, seq_len + 1)."""
    packer = BestFitPacker(split.lengths, seq_len + 1, buffer_size)
    tokens, offsets = split.tokens, split.offsets.tolist()
    while True:
        rows = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for r in range(batch_size):
            pos = 0
            for doc, take in packer.next_row():
                start = offsets[doc]
                rows[r, pos:pos + take] = tokens[start:start + take]
                pos += take
        yield rows, packer.epoch


def make_dataloader(split, batch_size, seq_len, device="cpu", buffer_size=1000):
    """Yields (inputs, targets, epoch) forever: inputs and targets are contiguous int64 tensors
    of shape (batch_size, seq_len) on `device`, targets shifted by one token."""
    device = torch.device(device)
    batches = pack_batches(split, batch_size, seq_len, buffer_size)
    if device.type != "cuda":
        for rows, epoch in batches:
            xy = torch.from_numpy(np.stack((rows[:, :-1], rows[:, 1:])))
            if device.type != "cpu":
                xy = xy.to(device)
            yield xy[0], xy[1], epoch
        return
    # CUDA: fill one of two pinned staging buffers while the other may still be copying.
    staging = [torch.empty((2, batch_size, seq_len), dtype=torch.int64, pin_memory=True)
               for _ in range(2)]
    copied = [None, None]
    for step, (rows, epoch) in enumerate(batches):
        k = step % 2
        if copied[k] is not None:
            copied[k].synchronize()
        host = staging[k].numpy()
        host[0] = rows[:, :-1]
        host[1] = rows[:, 1:]
        xy = staging[k].to(device, non_blocking=True)
        copied[k] = torch.cuda.Event()
        copied[k].record()
        yield xy[0], xy[1], epoch


# ---------------------------------------------------------------------------
# Preparing a dataset
# ---------------------------------------------------------------------------

def dataset_id(profile, source, vocab_size, seed):
    key = json.dumps({"format": FORMAT_VERSION, "profile": asdict(profile) | {"train": None},
                      "source": source.name, "fingerprint": source.fingerprint,
                      "vocab_size": vocab_size, "seed": seed}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def synthetic_floor(process, split, enc, profile):
    """bits per byte of the exact validation rows evaluate_bpb scores, under the true process:
    no model can do better on average."""
    packer = BestFitPacker(split.lengths, profile.max_seq_len + 1)
    bits = nbytes = 0.0
    for _ in range(eval_rows(profile)):
        for doc, take in packer.next_row():
            text = enc.decode_bytes(split.doc(doc)[1:take].tolist()).decode("ascii")
            bits += process.prefix_bits(text)
            nbytes += len(text)
    return bits / nbytes


def prepare(profile, source, root, vocab_size=None, seed=1337, tokenizer_chars=2_000_000_000,
            force=False, log=print):
    """Build (or find) the prepared dataset for this profile and source; make it current."""
    vocab_size = vocab_size or profile.vocab_size
    if not 256 + len(SPECIAL_TOKENS) <= vocab_size <= 2**32:
        raise PrepareError(f"vocab size {vocab_size} must be at least {256 + len(SPECIAL_TOKENS)}")
    name = f"{profile.name}-{source.name}-v{vocab_size}-{dataset_id(profile, source, vocab_size, seed)}"
    prepared_root = os.path.join(root, "prepared")
    final = os.path.join(prepared_root, name)
    os.makedirs(prepared_root, exist_ok=True)
    if os.path.exists(os.path.join(final, "meta.json")) and not force:
        log(f"already prepared: {final}")
        _set_current(root, name)
        return final

    build = tempfile.mkdtemp(prefix=f".build-{name}-", dir=prepared_root)
    try:
        t0 = time.time()
        enc = _build_tokenizer(source, vocab_size, tokenizer_chars, build, log)
        stats, val = _write_splits(source, enc, build, seed, vocab_size)
        packer = _evaluation_coverage(val, profile, log)
        floor = None
        if source.process is not None:
            floor = synthetic_floor(source.process, val, enc, profile)
            log(f"synthetic floor: val_bpb >= {floor:.6f}")

        meta = {
            "format": FORMAT_VERSION, "name": name, "created_at": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "profile": {k: v for k, v in asdict(profile).items() if k != "train"},
            "vocab_size": vocab_size, "seed": seed,
            "source": {"name": source.name, **source.fingerprint},
            "splits": stats, "floor_bpb": floor,
            "eval": {"rows": eval_rows(profile), "docs_fetched": packer.fetched},
        }
        with open(os.path.join(build, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(final):  # --force: the old one goes only once the new one is whole
            shutil.rmtree(final)
        os.replace(build, final)
    except OSError as e:
        shutil.rmtree(build, ignore_errors=True)
        if e.errno in _DISK_FULL:
            raise _disk_full(e, build) from None
        raise
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    _set_current(root, name)
    log(f"prepared {final} in {time.time() - t0:.1f}s")
    return final


def _build_tokenizer(source, vocab_size, tokenizer_chars, build, log):
    """A BPE tokenizer trained on (a capped share of) the train split, saved into build."""
    t0 = time.time()
    log(f"training a {vocab_size}-token BPE tokenizer on the train split...")

    def capped_train_text():
        total = 0
        for doc in source.documents("train"):
            doc = doc[:TOKENIZER_DOC_CHARS]
            total += len(doc)
            yield doc
            if total >= tokenizer_chars:
                return

    enc = train_tokenizer(capped_train_text(), vocab_size)
    if enc.n_vocab != vocab_size:
        raise PrepareError(f"the train split is too small to learn {vocab_size} tokens "
                           f"(got {enc.n_vocab}); use a smaller --vocab-size or more data")
    save_tokenizer(enc, build)
    log(f"tokenizer trained in {time.time() - t0:.1f}s")
    return enc


def _write_splits(source, enc, build, seed, vocab_size):
    """Both splits tokenized into build; returns ({split: stats}, the val TokenSplit)."""
    stats = {}
    for split in ("train", "val"):
        shuffle_seed = seed + (split == "val") if source.shuffle else None
        stats[split] = write_split(source.documents(split), enc, build, split, shuffle_seed)
        if stats[split]["docs"] < 2:
            raise PrepareError(
                f"the {split} split has {stats[split]['docs']} document(s): too few to train "
                f"and evaluate; give the source more documents (or another --val-fraction)")
    val = TokenSplit(build, "val", vocab_size)
    check_round_trip(enc, [enc.decode(val.doc(i)[1:].tolist()) for i in range(min(20, len(val)))])
    return stats, val


def _evaluation_coverage(val, profile, log):
    """How much of the val split the fixed evaluation reads (it cycles if the split is small):
    the packer after one evaluation pass."""
    packer = BestFitPacker(val.lengths, profile.max_seq_len + 1)
    for _ in range(eval_rows(profile)):
        packer.next_row()
    if packer.fetched > len(val):
        log(f"note: the val split ({len(val)} documents) is smaller than one evaluation pass "
            f"needs ({packer.fetched} fetched); evaluation reuses documents")
    return packer


def _set_current(root, name):
    tmp = os.path.join(root, f".current.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(name + "\n")
    os.replace(tmp, os.path.join(root, "current"))


# ---------------------------------------------------------------------------
# Runtime: what train.py and the loop use
# ---------------------------------------------------------------------------

class Prepared:
    """A prepared dataset: its profile, tokenizer, token cache, loader and metric."""

    def __init__(self, directory):
        self.dir = directory
        with open(os.path.join(directory, "meta.json")) as f:
            self.meta = json.load(f)
        if self.meta.get("format") != FORMAT_VERSION:
            raise PrepareError(f"{directory} was prepared by another version of prepare.py; "
                               f"run python prepare.py again")
        p = self.meta["profile"]
        known = PROFILES.get(p["name"])
        self.profile = Profile(**p, train=dict(known.train) if known else {})
        self.vocab_size = self.meta["vocab_size"]
        self.floor_bpb = self.meta.get("floor_bpb")
        self.tokenizer = load_tokenizer(directory)
        self.bos_token_id = self.tokenizer.encode_single_token(BOS)
        self.token_bytes = np.load(os.path.join(directory, "token_bytes.npy"))
        self._splits = {}
        self._fixed_eval = None

    def __repr__(self):
        return f"Prepared({self.dir!r}, profile={self.profile.name})"

    def split(self, name):
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {name!r}")
        if name not in self._splits:
            self._splits[name] = TokenSplit(self.dir, name, self.vocab_size)
        return self._splits[name]

    def make_dataloader(self, split, batch_size, device="cpu", seq_len=None, buffer_size=1000):
        return make_dataloader(self.split(split), batch_size, seq_len or self.profile.max_seq_len,
                               device, buffer_size)

    def fixed_eval(self):
        """The fixed evaluation of this dataset (its rows are packed once, on first use)."""
        if self._fixed_eval is None:
            self._fixed_eval = FixedEval(self)
        return self._fixed_eval

    def evaluate_bpb(self, model, batch_size):
        """val_bpb of `model` on the fixed validation rows; see FixedEval. model(inputs) must
        return logits of shape (B, T, vocab). Under the loop the rows and the arithmetic stay in
        the loop's process: this process only computes the per-token losses it is asked for."""
        score = model_scorer(model)
        if os.environ.get(EVAL_FD_ENV):
            return evaluate_remotely(int(os.environ[EVAL_FD_ENV]), score, batch_size)
        return self.fixed_eval().run(score, batch_size)


def load_prepared(path=None):
    """The dataset train.py uses: `path`, else $AUTORESEARCH_DATA, else the cache's current."""
    path = path or os.environ.get("AUTORESEARCH_DATA")
    if not path:
        root = cache_dir()
        try:
            with open(os.path.join(root, "current")) as f:
                path = os.path.join(root, "prepared", f.read().strip())
        except FileNotFoundError:
            raise PrepareError(f"no prepared data in {root}: run `python prepare.py` first "
                               f"(add --profile cpu|colab|h100 to choose)") from None
    if not os.path.exists(os.path.join(path, "meta.json")):
        raise PrepareError(f"{path} is not a prepared dataset: run `python prepare.py`")
    return Prepared(path)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description="Prepare data and tokenizer for autoresearch.")
    ap.add_argument("--profile", default="auto", choices=["auto", *PROFILES],
                    help="constants that make runs comparable (default: detected from hardware)")
    ap.add_argument("--source", help=f"one of {', '.join(SOURCES)}, or a path/glob of .txt, "
                    ".jsonl or .parquet files (default: the profile's)")
    ap.add_argument("--num-shards", type=int, default=10, help="climbmix training shards")
    ap.add_argument("--vocab-size", type=int, help="override the profile's vocabulary size")
    ap.add_argument("--val-fraction", type=float,
                    help="share held out for validation where the source has no val split "
                    f"(default {VAL_FRACTION}; 0.1 of the modules for python)")
    ap.add_argument("--text-key", default="text", help="JSON field / parquet column with text")
    ap.add_argument("--synthetic-docs", type=int, default=20000,
                    help="training documents of the synthetic source")
    ap.add_argument("--tokenizer-chars", type=int, default=2_000_000_000,
                    help="characters of training text the tokenizer learns from, at most")
    ap.add_argument("--cache-dir", help="where data lives (default: $AUTORESEARCH_CACHE or "
                    "~/.cache/autoresearch)")
    ap.add_argument("--hub-url", help=f"dataset hub base URL (default: $AUTORESEARCH_HUB_URL or "
                    f"{DEFAULT_HUB_URL})")
    ap.add_argument("--workers", type=int, default=8, help="parallel downloads")
    ap.add_argument("--seed", type=int, default=1337, help="document shuffling seed")
    ap.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    args = ap.parse_args(argv)

    try:
        if args.val_fraction is not None and not 0 < args.val_fraction < 1:
            raise PrepareError("--val-fraction must be between 0 and 1")
        name = detect_profile() if args.profile == "auto" else args.profile
        profile = PROFILES[name]
        root = cache_dir(args.cache_dir)
        spec = args.source or profile.source
        print(f"profile: {name}{' (detected)' if args.profile == 'auto' else ''}  "
              f"source: {spec}  cache: {root}")
        source = resolve_source(spec, args, root)
        path = prepare(profile, source, root, args.vocab_size, args.seed, args.tokenizer_chars,
                       args.force)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    meta = Prepared(path).meta
    for split, s in meta["splits"].items():
        print(f"{split:>5}: {s['docs']:,} documents, {s['tokens']:,} tokens, {s['bytes']:,} bytes")
    print("ready: python train.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
