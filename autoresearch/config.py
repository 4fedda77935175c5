"""The loop's settings, and the one place on the loop's side that reads AUTORESEARCH_* variables.

The trainer's side reads its own: train.py (budget, steps, device, dtype, compile), prepare.py
(cache, hub, data, the evaluation socket; it is also a standalone script and the trainer's
library) and supervisor.py (the evaluation socket's fd; it runs as `python -I -S`, without this
package). Everything here is read when asked, not at import, so a test's environment counts.
"""
import os
from dataclasses import dataclass, field
from typing import Callable

# Variables the loop sets for the trainer (read on the trainer's side, see above).
TIME_BUDGET_ENV = "AUTORESEARCH_TIME_BUDGET"
DATA_ENV = "AUTORESEARCH_DATA"


def sandbox_mode():
    """auto | on | off: $AUTORESEARCH_SANDBOX, else auto."""
    return os.environ.get("AUTORESEARCH_SANDBOX", "auto")


def time_budget():
    """Seconds per run asked for by $AUTORESEARCH_TIME_BUDGET, else 0 (the profile's)."""
    return float(os.environ.get(TIME_BUDGET_ENV) or 0)


def fixed_steps(trainer_env=None):
    """$AUTORESEARCH_STEPS as the trainer will see it (its own env first), else None: a run of
    fixed steps has no time budget to keep."""
    return (trainer_env or {}).get("AUTORESEARCH_STEPS") or os.environ.get("AUTORESEARCH_STEPS")


def memory_limit_gb():
    """$AUTORESEARCH_MEMORY_GB, the sandbox's address-space limit, as its raw text (or None)."""
    return os.environ.get("AUTORESEARCH_MEMORY_GB")


def bwrap_choice():
    """$AUTORESEARCH_BWRAP: a bwrap executable, "none" for none, or None (look on the PATH)."""
    return os.environ.get("AUTORESEARCH_BWRAP")


def llm_model():
    """$AUTORESEARCH_LLM_MODEL, or None."""
    return os.environ.get("AUTORESEARCH_LLM_MODEL")


@dataclass
class Settings:
    train_path: str = "train.py"
    space_path: str = "search_space.yaml"
    results_path: str = "results.tsv"
    strategy: str = "greedy"
    seed: int = 0
    judge: str = "noise"           # noise | threshold
    # The judge's and the stopping rule's defaults are what the replay of real runs chose
    # (BENCHMARKS.md, "Replay of real runs"): most true gain at <= 5% false keeps.
    baseline_runs: int = 2         # runs of the baseline before the first verdict
    max_runs: int = 3              # noise judge: runs a challenger gets at most
    confidence: float = 0.9        # noise judge: one-sided confidence a keep needs
    drop: float = 0.5              # noise judge: a first run with t below this is discarded
    min_delta: float = 0.0         # threshold judge: the margin a single run must beat
    git: bool = False
    tag: str = None
    data_dir: str = None           # a prepared dataset; default: the current one
    time_budget: float = None      # override the profile's TIME_BUDGET (quick looks, tests)
    grace: float = None            # seconds a trial may run beyond its budget (start-up, eval)
    oom_retries: int = 3
    max_proposals: int = 500       # invalid or repeated candidates tolerated per trial
    trainer_env: dict = field(default_factory=dict)
    llm: dict = field(default_factory=dict)  # LLM proposer options: base_url, model, key_env...
    worker: str = None             # the results' worker column; default host/device
    worker_slot: int = None        # which of this machine's workers this is (--workers)
    storage: str = None            # the study: default the journal file beside results_path
    study: str = "autoresearch"    # its name within the storage
    dry_run: bool = False          # write nothing: the study is read into memory
    heartbeat_seconds: float = 10.0  # shared study: how often this worker says it is alive
    lost_after: float = 60.0       # shared study: silence after which a trial is crash `lost`
    poll_seconds: float = 5.0      # how often a worker with nothing to run looks again
    run_fn: Callable = None        # runs one trial (default runner.run_trial); benchmarks swap it
    prune: str = "on"              # on | off: stop runs whose curve trails the incumbent's
    prune_start: float = 0.1       # earliest progress a run may be stopped at
    prune_sigmas: float = 1.5      # how far behind (in the noise at that progress) it must be
    audit: float = 0.1             # share of would-be-stopped runs let finish, to check the rule
    prune_reruns: bool = False     # also stop a race's re-runs (not only a challenger's first run)
    first_confidence: float = None  # noise judge: keep on one run this far ahead (None: never)
    incumbent_rule: str = "close"  # noise judge: race | close (when the incumbent is re-run)
    paired: bool = False           # noise judge: compare runs without their SEED's shared luck
    # auto | on | off (autoresearch/sandbox/); default $AUTORESEARCH_SANDBOX, else auto
    sandbox: str = field(default_factory=lambda: sandbox_mode())
