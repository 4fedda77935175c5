"""results.tsv: its columns and their text, reading it back, its claim, atomic rewrites.

results.tsv is the view of the study every run is a trial of (record.py): rewritten whole after
every change, in one rename, so pandas never reads half a file. A sidecar `<results>.meta.json`
records the profile, the prepared dataset and the budget the file belongs to, so one results
file never mixes runs that cannot be compared.

Files written before the last four columns (config, runs, mean_bpb, worker) existed still read:
the missing columns are filled in from the rows (the config from each run's own train.py where
runs/ still has it). Such a file, or any results.tsv from before the study, is imported into a
new study on the first start and then rewritten as its view.
"""
import contextlib
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
HEADER = "\t".join(COLUMNS) + "\n"
# Typed facts a row carries in the study beside the contract's columns, so nothing parses them back
# out of text: the run's kind (baseline | params | code | recheck), its OOM retry ([first, final]
# DEVICE_BATCH_SIZE, or None) and the hash of its code (history.code_fingerprint). results.tsv
# shows them only through description, strategy and config; rows of older files lack them.
STUDY_FIELDS = ("kind", "oom_retry", "code")


class LedgerError(ValueError):
    """A results file that belongs to another profile, dataset or budget, or is not ours."""


class StorageError(RuntimeError):
    """The shared study cannot be reached or holds something this loop cannot use. (Defined
    here, not in autoresearch/storage/, so that catching it does not import Optuna and
    SQLAlchemy.)"""


def write_atomic(path, text):
    """Replace `path` with `text` so that a reader or a kill sees the old file or the new one,
    never half of it (a temporary file per process and thread, fsynced, renamed)."""
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def directory_lock(directory):
    """An exclusive lock (flock) on a results directory: the processes of one machine that
    rewrite its results.tsv, or import one into a new study, take turns."""
    os.makedirs(directory, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def field_text(name, value):
    """One value as its results.tsv text (fixed decimals, JSON for dicts, no tabs or newlines)."""
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
    """A row as the text fields a results.tsv line holds (what Ledger.rows gives back), with the
    typed STUDY_FIELDS it carries kept as they are."""
    return {c: field_text(c, row.get(c)) for c in COLUMNS} | {
        f: row[f] for f in STUDY_FIELDS if f in row}


def format_row(row):
    """A row as a results.tsv line (refusing columns the contract does not have)."""
    unknown = set(row) - set(COLUMNS) - set(STUDY_FIELDS)
    if unknown:
        raise ValueError(f"unknown results column(s): {', '.join(sorted(unknown))}")
    return "\t".join(field_text(c, row.get(c)) for c in COLUMNS) + "\n"


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
        fingerprint = history.code_fingerprint(source, list(params), _defaults(r.get("profile"))) \
            if source is not None else ""
        r["config"] = history.config_id(params, fingerprint)
        values = seen.setdefault(r["config"], [])
        if r["status"] in history.FINISHED:
            values.append(float(r["val_bpb"]))
        r["runs"] = str(len(values))
        r["mean_bpb"] = f"{sum(values) / len(values):.6f}" if values and r["status"] != "crash" \
            else "0.000000"
        r["worker"] = ""


def _defaults(profile):
    """The train.py defaults of a named profile ({} for one prepare.py does not know): the
    loop's config ids count a constant at its default the same as None."""
    from prepare import PROFILES  # only for files from before the config column
    known = PROFILES.get(profile)
    return known.train if known is not None else {}
