"""The loop itself: propose, run, judge, record; train.py always holds the best so far.

loop.py and the notebook both drive this class:

    driver = Driver(Settings(strategy="greedy"))
    driver.run(trials=10)
"""
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field

import prepare
from autoresearch import edits
from autoresearch import ledger as ledger_mod
from autoresearch import sandbox as sandbox_mod
from autoresearch.judge import ThresholdJudge
from autoresearch.memory import oom_observations, shrink_to_fit
from autoresearch.patch import patch_constants, read_constants
from autoresearch.proposers import config_key, make_proposer
from autoresearch.protocol import progress_of
from autoresearch.runner import Outcome, run_trial
from autoresearch.space import PROFILE_NAMES, load_space


class LoopError(RuntimeError):
    """Something the user must fix before the loop can go on."""


@dataclass
class Settings:
    train_path: str = "train.py"
    space_path: str = "search_space.yaml"
    results_path: str = "results.tsv"
    strategy: str = "greedy"
    seed: int = 0
    min_delta: float = 0.0
    git: bool = False
    tag: str = None
    data_dir: str = None           # a prepared dataset; default: the current one
    time_budget: float = None      # override the profile's TIME_BUDGET (quick looks, tests)
    grace: float = None            # seconds a trial may run beyond its budget (start-up, eval)
    oom_retries: int = 3
    max_proposals: int = 500       # invalid or repeated candidates tolerated per trial
    trainer_env: dict = field(default_factory=dict)
    llm: dict = field(default_factory=dict)  # LLM proposer options: base_url, model, key_env...
    # auto | on | off (autoresearch/sandbox.py); $AUTORESEARCH_SANDBOX until the CLI has a flag
    sandbox: str = field(default_factory=lambda: os.environ.get("AUTORESEARCH_SANDBOX", "auto"))


def _write_atomic(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Driver:
    def __init__(self, settings, log=print):
        self.s = settings
        self.log = log
        self.train_path = os.path.abspath(settings.train_path)
        self.results_dir = os.path.dirname(os.path.abspath(settings.results_path))
        self.runs_dir = os.path.join(self.results_dir, "runs")
        try:
            self.data = prepare.load_prepared(settings.data_dir)
        except prepare.PrepareError as e:
            raise LoopError(str(e)) from None
        self.profile = self.data.profile
        try:
            with open(self.train_path) as f:
                source = f.read()
        except FileNotFoundError:
            raise LoopError(f"no {self.train_path}") from None
        self.space = load_space(settings.space_path, self.profile.name, self.context(source))
        self.names = list(self.space.params)
        self.ledger = ledger_mod.Ledger(settings.results_path)
        self.ledger.bind(self.profile.name, self.data.meta["name"])
        self.judge = ThresholdJudge(settings.min_delta)
        try:
            self.proposer = make_proposer(settings.strategy, self.space, settings.seed, settings.llm)
        except ValueError as e:
            raise LoopError(str(e)) from None
        self.proposer.check = self.cannot_run
        self.proposer.read_source = self.current_source
        self.proposer.defaults = dict(self.profile.train)
        self._source_hashes = {}  # trial directory -> hash of the train.py it ran
        budget = settings.time_budget or float(os.environ.get("AUTORESEARCH_TIME_BUDGET") or 0) \
            or self.profile.time_budget
        self.budget = budget
        self.time_limit = budget + (settings.grace if settings.grace is not None
                                    else max(60.0, 0.5 * budget))
        self.trainer_env = dict(settings.trainer_env)
        if settings.time_budget:
            self.trainer_env["AUTORESEARCH_TIME_BUDGET"] = str(settings.time_budget)
        if settings.git:
            self._git_start()
        self.rows = self.ledger.rows()
        self.proposer.warm_start(self.rows)
        self._restore_best()
        self._sandbox = None  # chosen (and announced) when the first trial runs

    # --- configuration ------------------------------------------------------------------------

    def effective(self, source):
        """train.py's literal constants, with None replaced by the profile's default."""
        return {n: (self.profile.train[n] if v is None and n in self.profile.train else v)
                for n, v in read_constants(source).items()}

    def context(self, source):
        p = self.profile
        return self.effective(source) | dict(zip(PROFILE_NAMES, (p.max_seq_len, p.time_budget,
                                                                 p.eval_tokens, p.vocab_size)))

    def current_source(self):
        with open(self.train_path) as f:
            return f.read()

    def searched(self, source):
        eff = self.effective(source)
        return {n: eff[n] for n in self.names}

    def best(self):
        """(searched values, val_bpb) of the best trial, or of train.py before any trial."""
        row = ledger_mod.best_row(self.rows)
        if row is None:
            return self.searched(self.current_source()), None
        return _untuple(json.loads(row["params"]), self.space), float(row["val_bpb"])

    def _restore_best(self):
        row = ledger_mod.best_row(self.rows)
        if row is None:
            return
        best, _ = self.best()
        source = self.current_source()
        drift = {n: v for n, v in best.items() if self.searched(source)[n] != v}
        if drift:
            _write_atomic(self.train_path, patch_constants(source, drift))
            self.log(f"restored train.py to the best so far (trial {row['trial']}, val_bpb "
                     f"{row['val_bpb']}): {', '.join(sorted(drift))}")

    # --- one trial ----------------------------------------------------------------------------

    def tried(self):
        """config key -> val_bpb (None for a crash) of every trial in the results."""
        out = {}
        for r in self.rows:
            if r.get("params"):
                value = float(r["val_bpb"]) if r["status"] in ("keep", "discard") else None
                out[config_key(_untuple(json.loads(r["params"]), self.space))] = value
        return out

    def tried_sources(self):
        """Hashes of every train.py a trial in the results ran (code mode's novelty check)."""
        out = set()
        for r in self.rows:
            if not r.get("log"):
                continue
            trial_dir = os.path.join(self.results_dir, os.path.dirname(r["log"]))
            if trial_dir not in self._source_hashes:
                try:
                    with open(os.path.join(trial_dir, "train.py"), "rb") as f:
                        self._source_hashes[trial_dir] = hashlib.sha1(f.read()).hexdigest()
                except FileNotFoundError:
                    continue
            out.add(self._source_hashes[trial_dir])
        return out

    def cannot_run(self, params, source=None):
        """Why a candidate will not be run (for proposers that can explain it), or None. A code
        edit (source given) is new when no trial ran that exact train.py."""
        if source is None:
            key = config_key(params)
            tried = self.tried()
            if key in tried:
                value = tried[key]
                return (f"this configuration was tried already (val_bpb {value:.6f})" if value
                        is not None else "this configuration was tried already and crashed")
        elif hashlib.sha1(source.encode()).hexdigest() in self.tried_sources():
            return "this exact train.py was tried already"
        context = self.context(source if source is not None else self.current_source())
        broken = self.space.violations(context | params)
        return f"it breaks the constraint(s): {'; '.join(broken)}" if broken else None

    def propose(self, best):
        """A candidate that is new and satisfies the constraints. Rejected ones are told to the
        proposer (a repeat with the value it already got) and never run or counted."""
        tried = self.tried()
        context = self.context(self.current_source())
        ooms = oom_observations(self.rows)
        for _ in range(self.s.max_proposals):
            cand = self.proposer.propose(best, self.rows)
            if cand.source is not None:  # a code edit: new if no trial ran this exact train.py
                reason = self.cannot_run(cand.params, cand.source)
                if reason is None:
                    return cand
                self.proposer.reject(cand)
                continue
            if ooms:  # shrink the micro-batch of a candidate known not to fit, before it runs
                fitted = shrink_to_fit(cand.params, ooms)
                if fitted is None:
                    self.proposer.reject(cand)
                    continue
                if fitted != cand.params:
                    note = (f"predicted oom: DEVICE_BATCH_SIZE {cand.params['DEVICE_BATCH_SIZE']}"
                            f"->{fitted['DEVICE_BATCH_SIZE']}")
                    cand.params = fitted
                    cand.changes = {k: v for k, v in fitted.items() if v != best.get(k)}
                    cand.description = f"{cand.description} ({note})"
            key = config_key(cand.params)
            if not cand.changes or key in tried:
                self.proposer.reject(cand, tried.get(key, self.best()[1]))
                continue
            if self.space.violations(context | cand.params):
                self.proposer.reject(cand)
                continue
            return cand
        raise LoopError(f"no new valid candidate in {self.s.max_proposals} proposals: the space "
                        f"looks exhausted or over-constrained")

    @property
    def sandbox(self):
        if self._sandbox is None:
            try:
                self._sandbox = sandbox_mod.choose(self.s.sandbox, log=self.log) or False
            except (sandbox_mod.SandboxError, ValueError) as e:
                raise LoopError(str(e)) from None
        return self._sandbox or None

    def run_trial(self, trial, params, on_line=None, base=None):
        """Run train.py (or `base`, a code edit's source) with `params`, retrying with half the
        micro-batch on OOM. Returns (outcome, trial source, note)."""
        base = self.current_source() if base is None else base
        eff = self.effective(base)
        changes = {n: v for n, v in params.items() if eff.get(n) != v}
        trial_dir = os.path.join(self.runs_dir, f"{trial:04d}")
        if os.path.exists(trial_dir):  # a trial cut short by a kill: start it afresh
            shutil.rmtree(trial_dir)
        first_micro = micro = (eff | changes).get("DEVICE_BATCH_SIZE")
        for attempt in range(self.s.oom_retries + 1):
            source = patch_constants(base, changes)
            outcome = run_trial(trial_dir, source, self.time_limit, self.data.dir,
                                self.trainer_env, on_line, sandbox=self.sandbox)
            if outcome.error != "oom" or attempt == self.s.oom_retries or not micro or micro < 2:
                break
            os.replace(outcome.log, os.path.join(trial_dir, f"run.oom{attempt + 1}.log"))
            self.log(f"trial {trial}: out of memory at DEVICE_BATCH_SIZE={micro}; retrying "
                     f"with {micro // 2} (TOTAL_BATCH_SIZE kept by gradient accumulation)")
            micro = changes["DEVICE_BATCH_SIZE"] = micro // 2
        note = f"oom retry: DEVICE_BATCH_SIZE {first_micro}->{micro}" if micro != first_micro else ""
        return outcome, source, note

    def record(self, trial, cand_changes, params, outcome, source, description, strategy):
        status = "crash"
        _, best_val = self.best()
        if outcome.ok:
            keep = self.judge.keep(outcome.summary["val_bpb"], best_val, self.rows)
            status = "keep" if keep else "discard"
        if status == "keep":
            _write_atomic(self.train_path, source)
        commit = self._commit(source, status, outcome, description)
        summ = outcome.summary
        row = {
            "commit": commit, "val_bpb": summ.get("val_bpb", 0.0),
            "memory_gb": summ.get("peak_vram_mb", 0.0) / 1024, "status": status,
            "description": description, "trial": trial, "started_at": self._started,
            "strategy": strategy, "profile": self.profile.name,
            "seed": self.effective(source).get("SEED", ""), "changes": cand_changes,
            "params": self.searched(source),
            **{k: summ.get(k, 0.0) for k in ("training_seconds", "total_seconds", "mfu_percent",
                                            "total_tokens_M", "num_params_M")},
            "num_steps": int(summ.get("num_steps", 0)), "error": outcome.error,
            "log": os.path.relpath(outcome.log, self.results_dir) if outcome.log else "",
        }
        self.ledger.append(row)
        self.rows = self.ledger.rows()
        return row

    def step(self, trial, on_line=None):
        """Run the next trial (the baseline first) and record it; returns the row written."""
        self._started = ledger_mod.now_iso()
        best, _ = self.best()
        if not self.rows:
            params, changes, description, strategy = best, {}, "baseline", "baseline"
        else:
            cand = self.propose(best)
            params, changes, description, strategy = (cand.params, cand.changes,
                                                      cand.description, self.proposer.name)
        code = None if strategy == "baseline" else cand.source
        outcome, source, note = self.run_trial(trial, params, on_line, base=code)
        if code is not None:
            outcome = self._check_code_trial(outcome, cand)
        if note:
            description = f"{description} ({note})"
        row = self.record(trial, changes, params, outcome, source, description, strategy)
        if strategy != "baseline":
            self.proposer.tell(cand, row)
        if outcome.error == "interrupted":
            raise KeyboardInterrupt
        if strategy == "baseline" and row["status"] == "crash":
            raise LoopError(f"the baseline crashed ({outcome.error}); see {outcome.log}")
        return row

    def _check_code_trial(self, outcome, cand):
        """Save a code edit's diff beside its log; a summary that breaks the contract (past the
        budget, another profile) makes the trial a crash, never a keep."""
        if outcome.log:
            with open(os.path.join(os.path.dirname(outcome.log), "edit.diff"), "w") as f:
                f.write(cand.meta.get("diff", ""))
        by_steps = self.trainer_env.get("AUTORESEARCH_STEPS") or os.environ.get("AUTORESEARCH_STEPS")
        if not outcome.ok or by_steps:  # a run of fixed steps has no budget to keep
            return outcome
        broken = edits.contract_violation(outcome.summary, self.budget, self.profile.name)
        if broken is None:
            return outcome
        return Outcome(False, f"error: contract: {broken}", {}, outcome.returncode,
                       outcome.wall_seconds, outcome.log)

    def run(self, trials=None, hours=None, progress=True):
        """Trials until `trials` more have run, `hours` have passed, or Ctrl-C."""
        from tqdm.auto import tqdm
        deadline = time.time() + hours * 3600 if hours else None
        total = trials + (0 if self.rows else 1) if trials is not None else None
        bar = tqdm(total=total, disable=not progress, unit="trial", dynamic_ncols=True)
        last_refresh = [0.0]
        interval = 0.5 if getattr(bar, "fp", None) is not None and _is_tty(bar.fp) else 30.0

        def on_line(line):  # the running trial's step and loss, at a readable pace
            p = progress_of(line)
            if p and time.time() - last_refresh[0] >= interval:
                last_refresh[0] = time.time()
                _, best_val = self.best()
                bar.set_postfix(strategy=self.s.strategy, best=f"{best_val:.6f}" if best_val else "-",
                                step=p[0], loss=f"{p[2]:.3f}")

        done = []
        try:
            while (total is None or len(done) < total) and (deadline is None or time.time() < deadline):
                trial = ledger_mod.next_trial(self.rows)
                bar.set_description(f"trial {trial}")
                row = self.step(trial, on_line)
                done.append(row)
                bar.update(1)
                bar.write(f"trial {trial:>4} {row['status']:>7} val_bpb {float(row['val_bpb']):.6f} "
                          f"{row['description'] or row['error']}"[:160])
        finally:
            bar.close()
        return done

    def dry_run(self, n):
        """The next n candidates the proposer would run from the current best; runs nothing."""
        best, _ = self.best()
        out = []
        for _ in range(n):
            cand = self.propose(best)
            out.append(cand)
            self.rows = self.rows + [{"params": json.dumps(cand.params, sort_keys=True, default=list),
                                      "status": "dry", "val_bpb": "0"}]
        self.rows = self.ledger.rows()
        return out

    # --- git ratchet --------------------------------------------------------------------------

    def _git(self, *args):
        repo = os.path.dirname(self.train_path)
        proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
        if proc.returncode:
            raise LoopError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def _git_start(self):
        tag = self.s.tag or time.strftime("%b%d").lower()
        branch = f"autoresearch/{tag}"
        self._git("rev-parse", "--git-dir")
        if self._git("status", "--porcelain", "--", os.path.basename(self.train_path)):
            raise LoopError("train.py has uncommitted changes; commit or stash them before --git")
        if self._git("branch", "--list", branch):
            if self._git("rev-parse", "--abbrev-ref", "HEAD") != branch:
                self._git("checkout", branch)
        else:
            self._git("checkout", "-b", branch)
        self.log(f"git: ratchet on branch {branch}")

    def _commit(self, source, status, outcome, description):
        if not self.s.git:
            return hashlib.sha1(source.encode()).hexdigest()[:7]
        if status == "keep":
            self._git("add", os.path.basename(self.train_path))
            if self._git("status", "--porcelain", "--", os.path.basename(self.train_path)):
                self._git("commit", "-q", "-m", f"val_bpb {outcome.summary['val_bpb']:.6f}: "
                          f"{description}"[:200])
        return self._git("rev-parse", "--short", "HEAD")


def _is_tty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _untuple(params, space):
    """JSON turns tuples into lists; give tuple-valued constants their tuples back."""
    out = {}
    for k, v in params.items():
        p = space.params.get(k)
        if isinstance(v, list) and p is not None and p.choices and isinstance(p.choices[0], tuple):
            v = tuple(v)
        out[k] = v
    return out
