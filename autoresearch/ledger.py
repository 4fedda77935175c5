"""results.tsv: append one trial per row, read it back, resume from it.

Each row goes to disk in a single write() under an exclusive lock, then fsync: a kill at any
moment leaves whole rows, and two loops sharing the file never interleave lines. A sidecar
`<results>.meta.json` records the profile and the prepared dataset the file belongs to, so one
results file never mixes runs that cannot be compared.
"""
import csv
import fcntl
import json
import math
import os
import time

COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description", "trial", "started_at",
           "strategy", "profile", "seed", "changes", "params", "training_seconds",
           "total_seconds", "mfu_percent", "num_steps", "total_tokens_M", "num_params_M",
           "error", "log"]
_FORMATS = {"val_bpb": "{:.6f}", "memory_gb": "{:.1f}", "training_seconds": "{:.1f}",
            "total_seconds": "{:.1f}", "mfu_percent": "{:.2f}", "total_tokens_M": "{:.1f}",
            "num_params_M": "{:.1f}"}


class LedgerError(ValueError):
    """A results file that belongs to another profile or dataset, or is not ours."""


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

    def bind(self, profile, data_name):
        """Claim the file for a profile and dataset (written with the first row), or refuse if
        it holds another."""
        self.claim = {"profile": profile, "data": data_name}
        if os.path.exists(self.meta_path):
            with open(self.meta_path) as f:
                have = json.load(f)
            for key in ("profile", "data"):
                if have.get(key) != self.claim[key]:
                    raise LedgerError(
                        f"{self.path} holds trials of {key} {have.get(key)!r}, but this run uses "
                        f"{self.claim[key]!r}; use another --results file (results are only "
                        f"comparable within one profile and dataset)")
        rows = self.rows()
        if rows and any(r["profile"] != profile for r in rows):
            raise LedgerError(f"{self.path} holds trials of profile {rows[0]['profile']!r}, not "
                              f"{profile!r}; use another --results file")

    def _write_claim(self):
        if self.claim is None or os.path.exists(self.meta_path):
            return
        tmp = f"{self.meta_path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.claim | {"created_at": now_iso()}, f, indent=1)
        os.replace(tmp, self.meta_path)

    def append(self, row):
        line = format_row(row).encode("utf-8")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._write_claim()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
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
        if lines[0].split("\t") != COLUMNS:
            raise LedgerError(f"{self.path} does not have the results.tsv columns; is it ours?")
        return list(csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))


def best_row(rows):
    """The kept row with the lowest val_bpb (the ratchet's current best), or None."""
    keeps = [r for r in rows if r["status"] == "keep"]
    return min(keeps, key=lambda r: float(r["val_bpb"])) if keeps else None


def next_trial(rows):
    return max((int(r["trial"]) for r in rows), default=-1) + 1
