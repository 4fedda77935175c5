"""What the results say: typed runs, the configs they belong to, and the noise between repeats.

A *run* is one row of results.tsv. A *config* is the recipe a run trained: the searched
constants except SEED, and the code of train.py with its constants blanked out. Runs of one
config differ only in SEED and in the machine's luck; their spread is the noise floor, and
their mean (never a single lucky run) is what the judge compares.

Rows are read into typed records here, once: the rest of the loop asks `run.kind` or
`run.oom_retry` instead of parsing descriptions. The loop writes those facts as typed fields of
the row too (ledger.STUDY_FIELDS); reading them back from the description's text is kept only
for rows of older results files.
"""
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache

from autoresearch.patch import PatchError, patch_constants, read_constants

FINISHED = ("keep", "discard", "retest")   # statuses of runs that produced a val_bpb
PRUNED = "pruned"                          # stopped early by the judge: rejected, no val_bpb
NOT_THE_CONFIGS_FAULT = ("interrupted", "lost")  # crashes that say nothing about the recipe
CODE_PREFIX = "llm code:"                  # how code-mode descriptions start (also older files)
CODE_STRATEGY = "llm-code"                 # the strategy column of code-mode edits
_OOM_RETRY = re.compile(r"oom retry: DEVICE_BATCH_SIZE (\d+)->(\d+)")


def code_fingerprint(source, names, defaults=None):
    """A short hash of train.py's code with the searched constants and SEED set to None: the
    same code with other constant values has the same fingerprint. A constant written as its
    `defaults` value (the profile's) counts as None, which is how train.py spelled it before the
    loop wrote the profile's values in: the same recipe keeps its id either way."""
    frozen = tuple(sorted((k, _frozen(v)) for k, v in (defaults or {}).items()))
    return _fingerprint(source, tuple(names), frozen)


def _frozen(value):
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


@lru_cache(maxsize=256)
def _fingerprint(source, names, defaults):
    blank = {n: None for n in (*names, "SEED")}
    if defaults:
        at_default = dict(defaults)
        try:
            written = read_constants(source)
        except PatchError:
            written = {}
        blank |= {n: None for n, v in written.items()
                  if n in at_default and _frozen(v) == at_default[n]}
    try:
        text = patch_constants(source, blank)
    except PatchError:
        try:
            text = patch_constants(source, {k: v for k, v in blank.items() if k != "SEED"})
        except PatchError:
            text = source
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def config_id(params, fingerprint=""):
    """The short stable id of a recipe: its searched values (SEED aside) and its code."""
    values = json.dumps({k: v for k, v in params.items() if k != "SEED"}, sort_keys=True,
                        default=list)
    return hashlib.sha1(f"{values}|{fingerprint}".encode()).hexdigest()[:8]


def tuples_back(params, space):
    """JSON turns tuples into lists; give tuple-valued constants their tuples back."""
    out = {}
    for k, v in params.items():
        p = space.params.get(k) if space is not None else None
        if isinstance(v, list) and p is not None and p.choices and isinstance(p.choices[0], tuple):
            v = tuple(v)
        out[k] = v
    return out


@dataclass
class Run:
    """One row of results.tsv, typed."""
    trial: int
    status: str                 # keep | discard | retest | crash
    value: float | None         # val_bpb, None for a crash
    params: dict
    config: str
    seed: int | None
    strategy: str
    kind: str                   # baseline | params | code | recheck
    description: str
    error: str
    oom_retry: tuple | None     # (first, final) DEVICE_BATCH_SIZE when an OOM retry shrank it
    row: dict = field(repr=False)
    code: str = ""              # the hash of its code (code_fingerprint); "" in older files

    @property
    def finished(self):
        return self.status in FINISHED

    @property
    def counts_against_config(self):
        """A crash the recipe caused (not a Ctrl-C or a lost worker)."""
        return self.status == "crash" and self.error not in NOT_THE_CONFIGS_FAULT

    @classmethod
    def from_row(cls, row, space=None):
        params = tuples_back(json.loads(row["params"]), space) if row.get("params") else {}
        status = row.get("status", "")
        strategy = row.get("strategy", "")
        description = row.get("description", "")
        try:
            seed = int(row.get("seed"))
        except (TypeError, ValueError):
            seed = None
        if "oom_retry" in row:
            oom = tuple(row["oom_retry"]) if row["oom_retry"] else None
        else:
            oom = _oom_retry_in_text(description)
        value = float(row["val_bpb"]) if status in FINISHED else None
        return cls(int(row.get("trial") or 0), status, value, params,
                   row.get("config") or config_id(params), seed, strategy,
                   row.get("kind") or _kind_in_text(strategy, description), description,
                   row.get("error", ""), oom, row, row.get("code", ""))


def oom_note(oom_retry):
    """How an OOM retry reads in a run's description (the typed fact is the row's oom_retry)."""
    return f"oom retry: DEVICE_BATCH_SIZE {oom_retry[0]}->{oom_retry[1]}" if oom_retry else ""


def _oom_retry_in_text(description):
    """An older row's OOM retry, read back from its description."""
    m = _OOM_RETRY.search(description)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _kind_in_text(strategy, description):
    """An older row's kind, told from its strategy and description."""
    if strategy in ("baseline", "recheck"):
        return strategy
    if strategy == CODE_STRATEGY or description.startswith(CODE_PREFIX):
        return "code"
    return "params"


@dataclass
class Config:
    """Every run of one recipe, and where its race stands."""
    id: str
    params: dict
    kind: str                   # of its first run: baseline, params or code
    strategy: str
    description: str            # of its first run
    first_trial: int
    values: list = field(default_factory=list)   # val_bpb of each finished run
    seeds: list = field(default_factory=list)    # the SEEDs it ran with (its own crashes too)
    trials: list = field(default_factory=list)   # every trial number, crashes included
    status: str = ""            # the judge's latest word: keep | discard | retest | pruned | crash
    crashes: int = 0            # crashes the recipe caused
    errors: list = field(default_factory=list)
    pruned: int = 0             # runs stopped early
    by_seed: dict = field(default_factory=dict)  # SEED -> val_bpb of each finished run

    @property
    def n(self):
        return len(self.values)

    @property
    def mean(self):
        return sum(self.values) / len(self.values) if self.values else None

    @property
    def std(self):
        if len(self.values) < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (len(self.values) - 1))

    @property
    def tried(self):
        """Whether a run of this recipe told anything: a value, a crash it caused, a stop."""
        return bool(self.values or self.crashes or self.pruned)

    @property
    def last_trial(self):
        return max(self.trials) if self.trials else -1

    def next_seed(self, base):
        return max(self.seeds) + 1 if self.seeds else base


def runs_of(rows, space=None):
    return [Run.from_row(r, space) for r in rows]


def configs_of(runs):
    """config id -> Config, in the order configs first ran."""
    out = {}
    for run in sorted(runs, key=lambda r: r.trial):
        c = out.get(run.config)
        if c is None:
            kind = run.kind if run.kind != "recheck" else "params"
            c = out[run.config] = Config(run.config, run.params, kind, run.strategy,
                                         run.description, run.trial)
        c.trials.append(run.trial)
        # a run lost or interrupted before its end told nothing: its SEED is run again
        if run.seed is not None and (run.status != "crash" or run.counts_against_config):
            c.seeds.append(run.seed)
        if run.finished:
            c.values.append(run.value)
            if run.seed is not None:
                c.by_seed[run.seed] = run.value
        if run.status == PRUNED:
            c.pruned += 1
        if run.counts_against_config:
            c.crashes += 1
            c.errors.append(run.error)
        if run.status != "crash" or run.counts_against_config:
            if run.kind != "recheck":  # a recheck measures; it does not change a verdict
                c.status = run.status
    return out


def incumbent_of(runs, configs):
    """The config of the latest keep row (the recipe train.py holds), or None."""
    keeps = [r for r in runs if r.status == "keep"]
    return configs[max(keeps, key=lambda r: r.trial).config] if keeps else None


@dataclass
class Standing:
    """What the results say at one moment, read once per change and handed to whoever decides
    on it (schedule, candidates, stopping): every row, the jobs other workers are running, the
    typed runs, their configs, the incumbent and the noise floor (judge.Noise, or None)."""
    rows: list
    running: list
    runs: list
    configs: dict
    incumbent: Config | None
    noise: object = None

    @classmethod
    def of(cls, rows, running, space, noise_floor):
        runs = runs_of(rows, space)
        configs = configs_of(runs)
        return cls(rows, running, runs, configs, incumbent_of(runs, configs),
                   noise_floor(configs))
