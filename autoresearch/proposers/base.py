"""What every proposer shares: the candidate it returns and the context it is handed.

A proposer is asked for one candidate at a time with a `Context`: the search space it was built
with, the incumbent, every config tried so far (means and run counts, not single runs), the
noise floor, the incumbent's train.py and a check that says why a candidate could not run. The
driver checks constraints and novelty again, so a proposer may return a candidate that is
rejected; rejected candidates are never run. When a config's race is decided (kept, discarded
or crashed, after as many runs as the judge wanted) the driver calls `tell` with its stats.
"""
import random
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Candidate:
    params: dict          # every searched constant -> value
    changes: dict         # the constants that differ from the incumbent at proposal time
    description: str      # short, human readable
    meta: dict = field(default_factory=dict)  # the proposer's own bookkeeping
    source: str = None    # code mode: the whole edited train.py the trial runs
    strategy: str = None  # the results' strategy column when not the proposer's name
    diff: str = ""        # code mode: the edit as a unified diff, kept beside the trial's log
    cost: dict = None     # a model's proposal: its tokens, seconds and how it went, kept as
                          # runs/<trial>/proposal.json for `loop.py report`


@dataclass
class Context:
    best: dict                  # the incumbent's searched values
    best_value: float | None    # the incumbent's mean val_bpb (None before the baseline ran)
    best_runs: int              # how many runs that mean stands on
    configs: dict               # config id -> history.Config: every recipe tried so far
    noise: object               # history.Noise, or None until some config ran twice
    source: str                 # the incumbent train.py
    defaults: dict              # the profile's values of constants train.py leaves at None
    check: Callable             # (params, source=None) -> why it cannot run, or None
    running: list = field(default_factory=list)  # jobs other workers are running now
    curves: dict = field(default_factory=dict)   # config id -> its latest run's curve line


def describe_changes(changes, best):
    return ", ".join(f"{k} {_short(best.get(k))}->{_short(v)}" for k, v in sorted(changes.items()))


def _short(v):
    return f"{v:g}" if isinstance(v, float) else str(v)


def changes_from(params, best):
    return {k: v for k, v in params.items() if v != best.get(k)}


class Proposer:
    name = "base"
    # What it needs beyond the Context's basics, declared so the driver asks instead of testing
    # strategy names:
    reads_curves = False  # ctx.curves, the training curve of each config's latest run
    edits_code = False    # its candidates carry a whole train.py (Candidate.source)

    def __init__(self, space, seed=0):
        self.space = space
        self.rng = random.Random(seed)

    def warm_start(self, ctx):
        """The configs already in the results, once, before the first proposal (resume)."""

    def propose(self, ctx):
        raise NotImplementedError

    def tell(self, candidate, config):
        """A config's race is decided: config.status is keep, discard, pruned (stopped early:
        rejected, mean None unless earlier runs finished) or crash, config.mean its mean over
        config.n runs. candidate is None when the race began before a restart."""

    def reject(self, candidate, known=None):
        """A candidate the driver will not run: it breaks a constraint, or its config was tried
        already (then known is that history.Config)."""
