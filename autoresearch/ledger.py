"""results.tsv: append one run per row, read it back, resume from it.

Each row goes to disk in a single write() under an exclusive lock, then fsync: a kill at any
moment leaves whole rows, and two loops sharing the file never interleave lines. A sidecar
`<results>.meta.json` records the profile and the prepared dataset the file belongs to, so one
results file never mixes runs that cannot be compared.

Files written before the last four columns (config, runs, mean_bpb, worker) existed still read:
the missing columns are filled in from the rows (the config from each run's own train.py where
runs/ still has it). The first append to such a file rewrites it whole with the new columns,
atomically, and keeps the original beside it as `<results>.20col.bak`.
"""
import csv
import fcntl
import json
import math
import os
import threading
import time

from autoresearch import history, trialdir

COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description", "trial", "started_at",
           "strategy", "profile", "seed", "changes", "params", "training_seconds",
           "total_seconds", "mfu_percent", "num_steps", "total_tokens_M", "num_params_M",
           "error", "log", "config", "runs", "mean_bpb", "worker"]
LEGACY_COLUMNS = COLUMNS[:20]
_FORMATS = {"val_bpb": "{:.6f}", "memory_gb": "{:.1f}", "training_seconds": "{:.1f}",
            "total_seconds": "{:.1f}", "mfu_percent": "{:.2f}", "total_tokens_M": "{:.1f}",
            "num_params_M": "{:.1f}", "mean_bpb": "{:.6f}"}


class LedgerError(ValueError):
    """A results file that belongs to another profile, dataset or budget, or is not ours."""


class StorageError(RuntimeError):
    """The shared study cannot be reached or holds something this loop cannot use. (Defined
    here, not in storage.py, so that catching it does not import Optuna and SQLAlchemy.)"""


def write_atomic(path, text):
    """Replace `path` with `text` so that a reader or a kill sees the old file or the new one,
    never half of it (a temporary file per process and thread, fsynced, renamed)."""
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _field(name, value):
    if value is None:
        value = 0.0 if name in _FORMATS else ""
    if name in _FORMATS:
        value = float(value)
        if not math.isfinite(value):
            value = 0.0
        return _FORMATS[name].format(value)
    if isinstance(value, (dict, list)):
        value = json.dumps(value, sort_keys=True)
    # A tab or newline would shift columns or split the row.
    return " ".join(str(value).replace("\t", " ").splitlines())


def as_text(row):
    """A row as the text fields a results.tsv line holds (what Ledger.rows gives back)."""
    return {c: _field(c, row.get(c)) for c in COLUMNS}


def format_row(row):
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown results column(s): {', '.join(sorted(unknown))}")
    return "\t".join(_field(c, row.get(c)) for c in COLUMNS) + "\n"


class Ledger:
    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.meta_path = os.path.splitext(self.path)[0] + ".meta.json"
        self.claim = None

    def recorded(self):
        """What the file was claimed for (profile, data, time_budget), or {} for a new file."""
        try:
            with open(self.meta_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def bind(self, profile, data_name, time_budget=None):
        """Claim the file for a profile, dataset and time budget (written with the first row),
        or refuse if it holds another: runs of other data or budgets cannot be compared."""
        self.claim = {"profile": profile, "data": data_name, "time_budget": time_budget}
        if os.path.exists(self.meta_path):
            have = self.recorded()
            keys = ("profile", "data") + (("time_budget",) if have.get("time_budget") else ())
            for key in keys:
                if have.get(key) != self.claim[key]:
                    raise LedgerError(
                        f"{self.path} holds runs of {key} {have.get(key)!r}, but this run uses "
                        f"{self.claim[key]!r}; use another --results file (results are only "
                        f"comparable within one profile, dataset and time budget)")
        rows = self.rows()
        if rows and any(r["profile"] != profile for r in rows):
            raise LedgerError(f"{self.path} holds trials of profile {rows[0]['profile']!r}, not "
                              f"{profile!r}; use another --results file")

    def write_claim(self):
        if self.claim is None or os.path.exists(self.meta_path):
            return
        write_atomic(self.meta_path, json.dumps(self.claim | {"created_at": now_iso()}, indent=1))

    def append(self, row):
        line = format_row(row).encode("utf-8")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.write_claim()
        fd = self._open_locked()
        try:
            size = os.fstat(fd).st_size
            if size and self._header() == LEGACY_COLUMNS:
                self._migrate()  # replaces the file: take the lock on the new one
                os.close(fd)
                fd = self._open_locked()
                size = os.fstat(fd).st_size
            if size == 0:
                line = ("\t".join(COLUMNS) + "\n").encode() + line
            elif not self._ends_with_newline(size):
                # A torn tail (only possible if something other than us wrote it): cut it off.
                os.ftruncate(fd, self._last_newline())
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock

    def _open_locked(self):
        """The results file opened for appending under an exclusive lock. If another writer
        replaced the file (a migration) while we waited, the lock we got is on the old one:
        open again."""
        while True:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _header(self):
        with open(self.path, newline="") as f:
            return f.readline().rstrip("\n").split("\t")

    def _migrate(self):
        """Rewrite a 20-column file with the new columns, atomically; keep the original."""
        rows = self.rows()
        backup = f"{self.path}.20col.bak"
        if not os.path.exists(backup):
            with open(self.path, "rb") as src, open(backup, "wb") as dst:
                dst.write(src.read())
        write_atomic(self.path, "\t".join(COLUMNS) + "\n" + "".join(format_row(r) for r in rows))

    def _ends_with_newline(self, size):
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            return f.read(1) == b"\n"

    def _last_newline(self):
        with open(self.path, "rb") as f:
            data = f.read()
        return data.rfind(b"\n") + 1

    def rows(self):
        """Every complete row, as dicts of strings."""
        try:
            with open(self.path, newline="") as f:
                text = f.read()
        except FileNotFoundError:
            return []
        if not text:
            return []
        if not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]
        lines = text.splitlines()
        header = lines[0].split("\t")
        if header not in (COLUMNS, LEGACY_COLUMNS):
            raise LedgerError(f"{self.path} does not have the results.tsv columns; is it ours?")
        rows = list(csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))
        if header == LEGACY_COLUMNS:
            complete_legacy(rows, os.path.dirname(self.path))
        return rows


def complete_legacy(rows, results_dir):
    """Fill config, runs, mean_bpb and worker into rows of a 20-column file, in place."""
    seen = {}
    for r in sorted(rows, key=lambda r: int(r["trial"] or 0)):
        params = json.loads(r["params"]) if r.get("params") else {}
        source = trialdir.read_source(results_dir, r.get("log"))
        fingerprint = history.code_fingerprint(source, list(params)) if source is not None else ""
        r["config"] = history.config_id(params, fingerprint)
        values = seen.setdefault(r["config"], [])
        if r["status"] in history.FINISHED:
            values.append(float(r["val_bpb"]))
        r["runs"] = str(len(values))
        r["mean_bpb"] = f"{sum(values) / len(values):.6f}" if values and r["status"] != "crash" \
            else "0.000000"
        r["worker"] = ""


def next_trial(rows):
    return max((int(r["trial"]) for r in rows), default=-1) + 1
