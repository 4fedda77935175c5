"""The loop itself, shaped like an Optuna Study: ask what to run, run it, tell the outcome.

    driver = Driver(Settings(strategy="greedy"))
    driver.run(trials=10)          # or one run at a time: row = driver.step()

`ask()` decides what runs next: the baseline (several SEEDs, so the noise floor is known before
the first verdict), the next run of a config whose race is open, a re-run of the incumbent, or a
new candidate from the proposer (new, inside the constraints, fitted to memory). `tell()` asks
the judge for a verdict, moves the ratchet (train.py always holds the incumbent) and writes the
row. loop.py and the notebook both drive this class.
"""
import json
import os
import random
import socket
import time
from dataclasses import dataclass

import prepare
from autoresearch import curves, edits, history, trialdir
from autoresearch import ledger as ledger_mod
from autoresearch import sandbox as sandbox_mod
from autoresearch.config import Settings, TIME_BUDGET_ENV, fixed_steps, time_budget  # noqa: F401 (Settings: re-exported)
from autoresearch.judge import EarlyStop, make_judge
from autoresearch.memory import oom_observations, shrink_to_fit
from autoresearch.patch import patch_constants, read_constants
from autoresearch.proposers import LLM_STRATEGIES, Context, make_proposer
from autoresearch.ratchet import GitRatchet, RatchetError, source_hash
from autoresearch.record import FileRecord, SharedRecord, optuna_distributions
from autoresearch.protocol import progress_of
from autoresearch.runner import Outcome, run_trial
from autoresearch.space import PROFILE_NAMES, load_space


class LoopError(RuntimeError):
    """Something the user must fix before the loop can go on."""


@dataclass
class Job:
    """One run to do."""
    purpose: str          # baseline | incumbent | retest | new | recheck
    kind: str             # baseline | params | code | recheck (the run's kind in results.tsv)
    params: dict          # every searched constant
    changes: dict         # against the incumbent when the config was proposed
    config: str
    seed: int
    source: str           # the whole train.py the run trains, SEED included
    description: str
    strategy: str
    candidate: object = None


def default_worker(slot=None):
    """host/device, e.g. gpubox/cuda:3; CPU workers sharing a machine are told apart by slot."""
    import torch
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        device = f"cuda:{visible}"
    elif torch.backends.mps.is_available():
        device = "mps"
    else:
        device = "cpu" if slot is None else f"cpu:{slot}"
    return f"{socket.gethostname()}/{device}"


class Driver:
    def __init__(self, settings, log=print):
        self.s = settings
        self.log = log
        self.train_path = os.path.abspath(settings.train_path)
        self.results_dir = os.path.dirname(os.path.abspath(settings.results_path))
        try:
            self.data = prepare.load_prepared(settings.data_dir)
        except prepare.PrepareError as e:
            raise LoopError(str(e)) from None
        self.profile = self.data.profile
        try:
            source = self.current_source()
        except FileNotFoundError:
            raise LoopError(f"no {self.train_path}") from None
        self.space = load_space(settings.space_path, self.profile.name, self.context(source))
        if "SEED" in self.space.params:
            raise LoopError(f"{settings.space_path}: SEED cannot be searched: a config's re-runs "
                            f"vary SEED themselves, and a kept seed change is luck, not a recipe")
        seed = read_constants(source).get("SEED")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise LoopError(f"{self.train_path} needs an integer literal SEED: re-runs of a "
                            f"config change it")
        self.names = list(self.space.params)
        try:
            self.judge = make_judge(settings.judge, confidence=settings.confidence,
                                    max_runs=settings.max_runs, min_delta=settings.min_delta,
                                    min_runs=min(2, settings.max_runs),
                                    first_confidence=settings.first_confidence,
                                    incumbent_rule=settings.incumbent_rule,
                                    paired=settings.paired)
            if settings.prune not in ("on", "off"):
                raise ValueError(f"prune must be on or off, not {settings.prune!r}")
            if not 0 <= settings.audit < 1:
                raise ValueError("the audit share must be at least 0 and below 1")
            self.stopper = EarlyStop(settings.prune_start, settings.prune_sigmas) \
                if settings.prune == "on" else None
            llm = dict(settings.llm, log=log) if settings.strategy in LLM_STRATEGIES else settings.llm
            self.proposer = make_proposer(settings.strategy, self.space, settings.seed, llm)
        except ValueError as e:
            raise LoopError(str(e)) from None
        if settings.baseline_runs < 1:
            raise LoopError("--baseline-runs must be at least 1")
        self.code_mode = settings.strategy == "llm" and settings.llm.get("scope") == "code"
        asked = settings.time_budget or time_budget()
        self.record = self._open_record(asked)
        # The budget is part of what makes runs comparable: a results file (or a study) keeps
        # the one it was started with (a resume needs no --budget), and refuses another.
        budget = asked or self.record.recorded().get("time_budget") or self.profile.time_budget
        self.record.bind(self.profile.name, self.data.meta["name"], float(budget))
        self.budget = float(budget)
        self.time_limit = budget + (settings.grace if settings.grace is not None
                                    else max(60.0, 0.5 * budget))
        self.trainer_env = dict(settings.trainer_env)
        if self.budget != self.profile.time_budget:
            self.trainer_env[TIME_BUDGET_ENV] = f"{self.budget:g}"
        self.run_fn = settings.run_fn or run_trial
        self.worker = settings.worker or default_worker(settings.worker_slot)
        try:
            self.ratchet = GitRatchet(self.train_path, settings.tag, log) if settings.git else None
        except RatchetError as e:
            raise LoopError(str(e)) from None
        self.pending = {}  # config id -> the proposer's candidate, while its race runs
        self._curves = {}  # trial -> curves.Curve of a finished run, read once
        self._sandbox = None  # chosen (and announced) when the first trial runs
        self.reload()
        self.base_seed = self._base_seed(seed)
        self._restore_incumbent()
        self.proposer.warm_start(self.proposal_context())
        # configs the proposer knows the verdict of; others' verdicts are told before it proposes
        self.told = {c.id for c in self.configs.values() if c.status in _DECIDED}

    def _open_record(self, budget):
        s = self.s
        if not s.storage:
            return FileRecord(s.results_path)
        limit = (budget or self.profile.time_budget) + (s.grace if s.grace is not None else 60.0)
        try:
            return SharedRecord(
                s.storage, s.study, s.results_path,
                # any worker may fail a trial held this long (a hung trainer, OOM retries)
                timeout=limit * (s.oom_retries + 1) + 120,
                distributions=optuna_distributions(self.space),
                heartbeat_seconds=s.heartbeat_seconds, grace=s.lost_after)
        except ValueError as e:
            raise LoopError(str(e)) from None

    # --- what the results say -----------------------------------------------------------------

    def reload(self):
        self.rows = self.record.rows()
        self.running = self.record.running()  # other workers' jobs (a shared study)
        self.runs = history.runs_of(self.rows, self.space)
        self.refresh()

    def refresh(self):
        self.configs = history.configs_of(self.runs)
        self.incumbent = history.incumbent_of(self.runs, self.configs)
        self.noise = history.noise_floor(self.configs)

    def _base_seed(self, seed):
        """Every config's runs use SEEDs base, base+1, ...: the first baseline run's SEED."""
        baseline = [r for r in self.runs if r.kind == "baseline" and r.seed is not None]
        return min(baseline, key=lambda r: r.trial).seed if baseline else seed

    def baseline(self):
        first = min((r for r in self.runs if r.kind == "baseline"), key=lambda r: r.trial,
                    default=None)
        return self.configs[first.config] if first else None

    def baseline_runs_left(self):
        """How many baseline runs are still to come before the first verdict."""
        base = self.baseline()
        if base is None:
            return self.s.baseline_runs
        if self.incumbent is not None and base.id == self.incumbent.id and base.crashes < 2:
            return max(0, self.s.baseline_runs - base.n)
        return 0

    def best(self):
        """(the incumbent's searched values, its mean val_bpb), or train.py's before any run."""
        if self.incumbent is None:
            return self.searched(self.current_source()), None
        return dict(self.incumbent.params), self.incumbent.mean

    # --- train.py -----------------------------------------------------------------------------

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

    def fingerprint(self, source):
        return history.code_fingerprint(source, self.names)

    def config_of(self, params, source):
        return history.config_id(params, self.fingerprint(source))

    def source_of(self, config):
        """The train.py a config trains (SEED as its first run had it), or None if lost."""
        first = next((r for r in self.runs if r.config == config.id and r.row.get("log")), None)
        here = trialdir.read_source(self.results_dir, first.row["log"]) if first else None
        if here is not None:
            return here
        shared = self.record.get_source(config.id)
        if shared is not None:
            return shared
        if config.kind == "code" or self.code_mode:
            return None  # edited code that is no longer on disk cannot be re-created
        current = self.current_source()
        now = self.searched(current)
        return patch_constants(current, {k: v for k, v in config.params.items() if now.get(k) != v})

    def _restore_incumbent(self):
        inc = self.incumbent
        if inc is None:
            return
        current = self.current_source()
        if self.code_mode:  # a code edit kept by a loop that died before writing its row
            want = self.source_of(inc)
            if want is not None and self.fingerprint(want) != self.fingerprint(current):
                ledger_mod.write_atomic(self.train_path,
                                        patch_constants(want, {"SEED": self.base_seed}))
                self.log(f"restored train.py to the incumbent's code (config {inc.id})")
                return
        now = self.searched(current)
        drift = {n: v for n, v in inc.params.items() if now.get(n) != v}
        if drift:
            ledger_mod.write_atomic(self.train_path, patch_constants(current, drift))
            self.log(f"restored train.py to the incumbent (config {inc.id}, mean val_bpb "
                     f"{inc.mean:.6f} over {inc.n} runs): {', '.join(sorted(drift))}")

    # --- ask ----------------------------------------------------------------------------------

    def proposal_context(self):
        best, value = self.best()
        return Context(best=best, best_value=value,
                       best_runs=self.incumbent.n if self.incumbent else 0,
                       configs=self.configs, noise=self.noise, source=self.current_source(),
                       defaults=dict(self.profile.train), check=self.cannot_run,
                       running=[j for j in self.running if j.get("params")],
                       curves=self.curve_lines() if self.s.strategy in LLM_STRATEGIES else {})

    def curve_of(self, run):
        """The training curve of a run (curves.Curve), kept as curve.json beside its log; None
        for a run whose log is not on this machine."""
        if not run.row.get("log"):
            return None
        cached = self._curves.get(run.trial)
        if cached is not None:
            return cached
        curve = trialdir.curve(self.results_dir, run.row["log"])
        if curve is not None:
            self._curves[run.trial] = curve
        return curve

    # --- stopping hopeless runs ---------------------------------------------------------------

    def early_stop(self, job, trial):
        """The watch that may stop this job's run (judge.EarlyStop), or None: only a challenger
        is stopped, never the baseline, the incumbent or a recheck, and only at checkpoints
        where the incumbent has curves and the noise is known."""
        if self.stopper is None or job.purpose not in ("new", "retest") \
                or self.incumbent is None or job.config == self.incumbent.id:
            return None
        noise_at = curves.noise_at([[self.checkpoints_of(r) for r in self.runs
                                     if r.config == c.id and r.finished]
                                    for c in self.configs.values() if c.n > 1])
        mine = [self.checkpoints_of(r) for r in self.runs
                if r.config == self.incumbent.id and r.finished]
        reference = self.stopper.reference([m for m in mine if m], noise_at)
        if not reference:
            return None
        audit = random.Random(f"{self.s.seed}:{trial}").random() < self.s.audit
        return self.stopper.watch(reference, audit)

    def checkpoints_of(self, run):
        """{progress: smoothed loss} of a run at curves.CHECKPOINTS ({} without a log here)."""
        curve = self.curve_of(run)
        if curve is None or not curve.checkpoints:
            return {}
        return {p: v for p, v in zip(curves.CHECKPOINTS, curve.checkpoints) if v is not None}

    def curve_lines(self):
        """config id -> the curve line of its latest finished run (what the LLM reads)."""
        latest = {}
        for r in self.runs:
            if r.finished:
                latest[r.config] = r
        out = {}
        for config, run in latest.items():
            curve = self.curve_of(run)
            if curve is not None and curve.steps:
                out[config] = curve.line()
        return out

    def cannot_run(self, params, source=None):
        """Why a candidate will not be run, or None. A config is new when no run trained it
        and no other worker is training it now."""
        code = source if source is not None else self.current_source()
        config = self.config_of(params, code)
        if any(j.get("config") == config for j in self.running):
            return "another worker is running this configuration now"
        known = self.configs.get(config)
        if known is not None and known.tried:  # (an interrupted run is no try)
            if known.status == "retest":
                return f"this configuration is being re-run already (mean {known.mean:.6f} over {known.n})"
            if known.status == "pruned" and known.mean is None:
                return "this configuration was tried already and stopped early (pruned)"
            if known.mean is not None:
                return (f"this configuration was tried already (mean val_bpb {known.mean:.6f} "
                        f"over {known.n} run{'s' if known.n > 1 else ''})")
            return "this configuration was tried already and crashed"
        broken = self.space.violations(self.context(code) | params)
        return f"it breaks the constraint(s): {'; '.join(broken)}" if broken else None

    def ask(self):
        """The next run: the baseline's SEEDs first (side by side when several workers share
        the study), then open races (with the incumbent's re-runs the judge asks for), then a
        new candidate. None when everything that could run is being run by other workers."""
        inc, base = self.incumbent, self.baseline()
        busy = {j.get("config") for j in self.running}
        if inc is None or base is not None and base.id == inc.id and base.crashes < 2 \
                and base.n < self.s.baseline_runs:
            under_way = sum(j.get("purpose") == "baseline" for j in self.running)
            if (base.n if base else 0) + under_way < self.s.baseline_runs:
                return self._rerun_job(base, "baseline")
            return None  # no verdict before the baseline's runs are in
        self._restore_incumbent()  # another worker (machine) may have kept something
        if inc.crashes < 2 and inc.id not in busy and self.noise is None \
                and self.judge.name == "noise" and inc.n < self.s.baseline_runs:
            return self._rerun_job(inc, "incumbent", "noise floor first")
        race = next((c for c in self.configs.values() if c.status == "retest"
                     and c.id not in busy), None)
        if race is not None:
            if inc.crashes < 2 and inc.id not in busy and self.judge.wants_incumbent_run(inc, race,
                                                                                    self.noise):
                return self._rerun_job(inc, "incumbent", f"during the race of {race.id}")
            return self._rerun_job(race, "retest")
        return self._new_job()

    def _running_seeds(self, config_id):
        return [j["seed"] for j in self.running if j.get("config") == config_id and "seed" in j]

    def _rerun_job(self, config, purpose, why=""):
        """Another run of a known config (or the first baseline run), with a SEED it has not
        used and no other worker is using."""
        if config is None:
            source = self.current_source()
            params = self.searched(source)
            config_id = self.config_of(params, source)
            seed = max(self._running_seeds(config_id), default=self.base_seed - 1) + 1
            k = seed - self.base_seed + 1
            return Job("baseline", "baseline", params, {}, config_id, seed,
                       patch_constants(source, {"SEED": seed}),
                       "baseline" if k == 1 else f"baseline (run {k}/{self.s.baseline_runs})",
                       "baseline")
        source = self.source_of(config)
        if source is None:
            raise LoopError(f"the train.py of config {config.id} is in no runs/ directory here "
                            f"and not in the shared study; it cannot be re-run")
        seed = max([config.next_seed(self.base_seed) - 1, *self._running_seeds(config.id)]) + 1
        run = len(config.values) + 1 + len(self._running_seeds(config.id))
        if purpose == "baseline":
            description = f"baseline (run {run}/{self.s.baseline_runs})"
        elif purpose == "incumbent":
            description = f"incumbent re-run {run} ({why})"
        else:
            description = f"retest {run}/{self.s.max_runs}: {config.description}"
        kind = config.kind if purpose != "recheck" else "recheck"
        strategy = config.strategy if purpose != "recheck" else "recheck"
        first = next(r for r in self.runs if r.config == config.id)
        return Job(purpose, kind, dict(config.params), dict(_changes_of(first)), config.id, seed,
                   patch_constants(source, {"SEED": seed}), description, strategy,
                   self.pending.get(config.id))

    def _new_job(self):
        self._catch_up()
        try:
            cand = self.propose()
        except LoopError:
            if self.running:  # what other workers are running may open races: wait for them
                return None
            raise
        current = self.current_source()
        now = self.searched(current)
        base = cand.source if cand.source is not None else patch_constants(
            current, {k: v for k, v in cand.params.items() if now.get(k) != v})
        source = patch_constants(base, {"SEED": self.base_seed})
        kind = "code" if cand.source is not None else "params"
        return Job("new", kind, cand.params, cand.changes, self.config_of(cand.params, base),
                   self.base_seed, source, cand.description,
                   cand.strategy or self.proposer.name, cand)

    def propose(self):
        """A candidate that is new and satisfies the constraints. Rejected ones are told to the
        proposer (a repeat with the config it repeats) and never run or counted."""
        ctx = self.proposal_context()
        best = ctx.best
        ooms = oom_observations(self.runs)
        for _ in range(self.s.max_proposals):
            cand = self.proposer.propose(ctx)
            if cand.source is not None:  # a code edit: new if no run trained this code + values
                if self.cannot_run(cand.params, cand.source) is None:
                    return cand
                self.proposer.reject(cand, self.configs.get(self.config_of(cand.params, cand.source)))
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
            if not cand.changes:
                self.proposer.reject(cand, self.incumbent)
                continue
            reason = self.cannot_run(cand.params)
            if reason is not None:
                self.proposer.reject(cand, self.configs.get(self.config_of(cand.params,
                                                                           ctx.source)))
                continue
            return cand
        raise LoopError(f"no new valid candidate in {self.s.max_proposals} proposals: the space "
                        f"looks exhausted or over-constrained")

    # --- run ----------------------------------------------------------------------------------

    @property
    def sandbox(self):
        """The sandbox trials run in (None: off), chosen and announced at the first trial, so
        --dry-run and --trials 0 stay quiet."""
        if self._sandbox is None:
            try:
                self._sandbox = sandbox_mod.choose(self.s.sandbox, log=self.log) or False
            except (sandbox_mod.SandboxError, ValueError) as e:
                raise LoopError(str(e)) from None
        return self._sandbox or None

    def run_job(self, trial, job, on_line=None):
        """Train the job's source, retrying with half the micro-batch on OOM. Returns (outcome,
        the source that ran last, a note for the description)."""
        trial_dir = trialdir.fresh(self.results_dir, trial)
        source = job.source
        first_micro = micro = self.effective(source).get("DEVICE_BATCH_SIZE")
        for attempt in range(self.s.oom_retries + 1):
            outcome = self.run_fn(trial_dir, source, self.time_limit, self.data.dir,
                                  self.trainer_env, on_line, sandbox=self.sandbox)
            if outcome.error != "oom" or attempt == self.s.oom_retries or not micro or micro < 2:
                break
            os.replace(outcome.log, trialdir.oom_log(trial_dir, attempt + 1))
            self.log(f"trial {trial}: out of memory at DEVICE_BATCH_SIZE={micro}; retrying "
                     f"with {micro // 2} (TOTAL_BATCH_SIZE kept by gradient accumulation)")
            micro //= 2
            source = patch_constants(source, {"DEVICE_BATCH_SIZE": micro})
        note = f"oom retry: DEVICE_BATCH_SIZE {first_micro}->{micro}" if micro != first_micro else ""
        if job.kind == "code":
            outcome = self._check_code_trial(outcome, job)
        return outcome, source, note

    def _check_code_trial(self, outcome, job):
        """Save a code edit's diff beside its log; a summary that breaks the contract (past the
        budget, another profile) makes the trial a crash, never a keep."""
        diff = job.candidate.meta.get("diff", "") if job.candidate is not None else ""
        if outcome.log and diff:
            trialdir.write_diff(outcome.log, diff)
        by_steps = fixed_steps(self.trainer_env)
        if not outcome.ok or by_steps:  # a run of fixed steps has no budget to keep
            return outcome
        broken = edits.contract_violation(outcome.summary, self.budget, self.profile.name)
        if broken is None:
            return outcome
        return Outcome(False, f"error: contract: {broken}", {}, outcome.returncode,
                       outcome.wall_seconds, outcome.log)

    # --- tell ---------------------------------------------------------------------------------

    def tell(self, job, trial, outcome, source, note="", started=None):
        """Judge the run, move the ratchet, write the row; returns (row, verdict reason)."""
        if self.record.shared:
            self.reload()  # other workers' runs since this one started count in its verdict
        params = self.searched(source)
        config = job.config if params == job.params else self.config_of(params, source)
        description = f"{job.description} ({note})" if note else job.description
        summary = outcome.summary
        row = {
            # as results.tsv records it (6 decimals), so a verdict can be redone from the file
            "val_bpb": round(summary.get("val_bpb", 0.0), 6),
            "memory_gb": summary.get("peak_vram_mb", 0.0) / 1024, "status": "crash",
            "description": description, "trial": trial,
            "started_at": started or ledger_mod.now_iso(), "strategy": job.strategy,
            "profile": self.profile.name, "seed": job.seed, "changes": job.changes,
            "params": params,
            **{k: summary.get(k, 0.0) for k in ("training_seconds", "total_seconds",
                                               "mfu_percent", "total_tokens_M", "num_params_M")},
            "num_steps": int(summary.get("num_steps", 0)), "error": outcome.error,
            "log": os.path.relpath(outcome.log, self.results_dir) if outcome.log else "",
            "config": config, "worker": self.worker,
        }
        provisional = "discard" if outcome.ok else "pruned" if outcome.pruned else "crash"
        run = history.Run(trial, provisional,  # provisional status
                          row["val_bpb"] if outcome.ok else None, params, config, job.seed,
                          job.strategy, job.kind, description, outcome.error, None, row)
        after = history.configs_of(self.runs + [run])
        mine, inc = after[config], self.incumbent and after[self.incumbent.id]
        reason = outcome.error
        if outcome.pruned:
            status = "pruned"
        elif not outcome.ok:
            status = "crash"
        elif inc is None or config == inc.id:
            status, reason = "keep", "the incumbent"
        elif job.purpose == "recheck":
            status, reason = "discard", "not the incumbent"
        else:
            verdict = self.judge.verdict(mine, inc, history.noise_floor(after))
            status, reason = verdict.status, verdict.reason
        row["status"] = status
        row["runs"] = mine.n
        row["mean_bpb"] = mine.mean if status not in ("crash", "pruned") and mine.mean is not None \
            else 0.0
        if status == "keep" and (inc is None or config != inc.id):
            ledger_mod.write_atomic(self.train_path, patch_constants(source, {"SEED": self.base_seed}))
        row["commit"] = self._commit(source, status == "keep" and (inc is None or config != inc.id),
                                     f"val_bpb {mine.mean or 0:.6f} over {mine.n} runs: {description}")
        self.record.finish(trial, row)
        self.reload()
        self._tell_proposer(job, config, status)
        return row, reason

    def _tell_proposer(self, job, config, status):
        if job.purpose not in ("new", "retest"):
            return
        if status == "retest":
            if job.candidate is not None:
                self.pending[config] = job.candidate
            return
        candidate = self.pending.pop(config, None) or job.candidate
        if (candidate is not None or job.purpose == "retest") and config not in self.told:
            self.told.add(config)
            self.proposer.tell(candidate, self.configs[config])

    def _catch_up(self):
        """Tell the proposer the verdicts it has not heard: other workers' configs, and races
        that began before a restart."""
        for c in self.configs.values():
            if c.status in _DECIDED and c.id not in self.told and c.id not in self.pending:
                self.told.add(c.id)
                self.proposer.tell(None, c)

    def _commit(self, source, keep, message):
        if self.ratchet is None:
            return source_hash(source)
        try:
            return self.ratchet.commit(source, keep, message)
        except RatchetError as e:
            raise LoopError(str(e)) from None

    def close(self):
        """Stop the shared study's heartbeats (a file record has nothing to stop)."""
        self.record.close()

    # --- driving ------------------------------------------------------------------------------

    def step(self, trial=None, on_line=None):
        """Ask, run and tell one run; returns the row written."""
        return self._step(trial, on_line)[0]

    def _reserve(self, trial=None):
        """The next job and its trial number. In a shared study the number comes from the
        storage (unique across workers), and a job whose config another worker took a moment
        ago is asked again; with nothing to run, the worker waits for the others."""
        waited = False
        while True:
            job = self.ask()
            if job is not None:
                if self.record.shared and self.code_mode:  # so other machines can re-run it
                    self.record.put_source(job.config, patch_constants(job.source,
                                                                       {"SEED": self.base_seed}))
                number = self.record.reserve(self._job_attrs(job), self.rows)
                if number is not None:
                    return job, (number if trial is None or self.record.shared else trial)
                if job.candidate is not None:  # taken by another worker: tell it as a repeat
                    self.proposer.reject(job.candidate)
            elif not waited:
                self.log(f"[{self.worker}] waiting: what can run next is running on other workers")
                waited = True
            time.sleep(0 if job is not None else self.s.poll_seconds)
            self.reload()

    def _after_watch(self, outcome, watch, note):
        """A stopped run's row shows what it used; an audited run says what it escaped."""
        if outcome.pruned:
            outcome.summary = {"training_seconds": watch.progress * self.budget,
                               "total_seconds": outcome.wall_seconds, "num_steps": watch.step}
        elif watch.audit and watch.reason and outcome.ok:
            note = "; ".join(filter(None, [note, f"audit: would have been {watch.reason}"]))
        return note

    def _keep_proposal(self, trial, meta):
        """What an LLM proposal cost (tokens, seconds, format, valid/repaired/fallback), as
        runs/<trial>/proposal.json: `loop.py report` sums it per strategy."""
        trialdir.write_proposal(self.results_dir, trial, {k: v for k, v in meta.items()
                                                          if k != "diff"})

    def _job_attrs(self, job):
        """What other workers see of a job while it runs."""
        return {"config": job.config, "params": json.loads(json.dumps(job.params, default=list)),
                "seed": job.seed, "purpose": job.purpose, "kind": job.kind,
                "strategy": job.strategy, "description": job.description,
                "changes": json.loads(json.dumps(job.changes, default=list)),
                "worker": self.worker, "started_at": ledger_mod.now_iso()}

    def _step(self, trial=None, on_line=None):
        job, trial = self._reserve(trial)
        started = ledger_mod.now_iso()
        watch = self.early_stop(job, trial)
        try:
            outcome, source, note = self.run_job(trial, job, _watched(on_line, watch))
            if watch is not None:
                note = self._after_watch(outcome, watch, note)
            if job.purpose == "new" and job.candidate is not None \
                    and job.candidate.meta.get("llm"):  # once per proposal, not per re-run
                self._keep_proposal(trial, job.candidate.meta)
        except BaseException:
            # never leave a reserved trial without its row (Ctrl-C outside the trainer, a bug)
            self.tell(job, trial, Outcome(False, "interrupted"), job.source, "", started)
            raise
        row, reason = self.tell(job, trial, outcome, source, note, started)
        if outcome.error == "interrupted":
            raise KeyboardInterrupt
        if job.purpose == "baseline" and row["status"] == "crash" and len(self.configs) == 1 \
                and not self.configs[row["config"]].n:
            raise LoopError(f"the baseline crashed ({outcome.error}); see {outcome.log}")
        return row, reason, job

    def run(self, trials=None, hours=None, progress=True):
        """Runs until `trials` more have run (every run counts: baseline repeats and re-runs
        too), `hours` have passed, or Ctrl-C."""
        from tqdm.auto import tqdm
        deadline = time.time() + hours * 3600 if hours else None
        bar = tqdm(total=trials, disable=not progress, unit="run", dynamic_ncols=True)
        last_refresh = [0.0]
        interval = 0.5 if getattr(bar, "fp", None) is not None and _is_tty(bar.fp) else 30.0

        def on_line(line):  # the running trial's step and loss, at a readable pace
            p = progress_of(line)
            if p and time.time() - last_refresh[0] >= interval:
                last_refresh[0] = time.time()
                _, best = self.best()
                bar.set_postfix(incumbent=f"{best:.6f}" if best else "-", step=p[0],
                                loss=f"{p[2]:.3f}")

        done = []
        try:
            while (trials is None or len(done) < trials) and (deadline is None or time.time() < deadline):
                row, reason, job = self._step(None, on_line)
                done.append(row)
                bar.update(1)
                bar.set_description(f"trial {row['trial']}")
                line = self.trial_line(row, reason)
                bar.write(line if self.s.worker_slot is None else f"[{self.worker}] {line}")
        finally:
            bar.close()
        return done

    def trial_line(self, row, reason=""):
        """One line per run: its status and value, its config and where its race stands."""
        inc = self.incumbent
        value = float(row["val_bpb"])
        head = (f"trial {row['trial']:>4} {row['status']:>7} "
                f"{'val_bpb ' + format(value, '.6f') if row['status'] not in ('crash', 'pruned') else row['error']}")
        where = f"config {row['config']} run {row['runs']}"
        if row["status"] != "crash" and row["runs"] > 1:
            where += f" mean {float(row['mean_bpb']):.6f}"
        if inc is not None and inc.id != row["config"]:
            where += f" | incumbent {inc.mean:.6f} over {inc.n}"
        text = f"{head} | {where} | {row['description']}"
        if reason and row["status"] not in ("crash", "pruned") and reason not in ("the incumbent", "not the incumbent"):
            text += f" | {reason}"
        return text[:300]

    def dry_run(self, n):
        """The next n new candidates the proposer would run from the incumbent; runs nothing."""
        out = []
        saved = self.configs
        try:
            for _ in range(n):
                cand = self.propose()
                out.append(cand)
                cid = self.config_of(cand.params, cand.source or self.current_source())
                self.configs = dict(self.configs) | {cid: history.Config(
                    cid, cand.params, "params", "dry", cand.description, -1, status="discard")}
        finally:
            self.configs = saved
        return out

    def recheck(self, runs=3, on_line=None):
        """Re-run the baseline and the incumbent `runs` times each with SEEDs neither has used,
        interleaved, as rows of strategy `recheck`; returns how much of the recorded gain
        survives."""
        base, inc = self.baseline(), self.incumbent
        if base is None or inc is None:
            raise LoopError("nothing to recheck: the results hold no baseline yet")
        if base.id == inc.id:
            raise LoopError("nothing to recheck: the baseline is still the incumbent")
        recorded = base.mean - inc.mean
        before = {base.id: base.n, inc.id: inc.n}
        rows = []
        for k in range(runs):
            for config, who in ((base, "baseline"), (inc, "incumbent")):
                config = self.configs[config.id]
                job = self._rerun_job(config, "recheck")
                job.description = f"recheck {k + 1}/{runs} of the {who} ({config.id})"
                trial = self.record.reserve(self._job_attrs(job), self.rows)
                if trial is None:
                    raise LoopError(f"another worker is running config {config.id}; recheck "
                                    f"when the workers have stopped")
                outcome, source, note = self.run_job(trial, job, on_line)
                row, _ = self.tell(job, trial, outcome, source, note)
                rows.append(row)
                self.log(self.trial_line(row))
                if outcome.error == "interrupted":
                    raise KeyboardInterrupt
        fresh = {cid: [float(r["val_bpb"]) for r in rows
                       if r["config"] == cid and r["status"] != "crash"] for cid in before}
        if not fresh[base.id] or not fresh[inc.id]:
            raise LoopError("the recheck runs crashed; see their rows in the results")
        again = _mean(fresh[base.id]) - _mean(fresh[inc.id])
        return {"recorded_gain": recorded, "recorded_runs": before, "rechecked_gain": again,
                "rechecked_runs": {k: len(v) for k, v in fresh.items()},
                "retained": again / recorded if recorded else None,
                "baseline": base.id, "incumbent": inc.id, "noise": self.noise}


_DECIDED = ("keep", "discard", "pruned", "crash")


def _watched(on_line, watch):
    """One per-line callback for the runner: the progress display, then the early-stop watch
    (whose answer, a reason to stop, is what the runner acts on)."""
    if watch is None:
        return on_line

    def both(line):
        if on_line is not None:
            on_line(line)
        return watch(line)
    return both


def _changes_of(run):
    try:
        return json.loads(run.row.get("changes") or "{}")
    except ValueError:
        return {}


def _mean(values):
    return sum(values) / len(values)


def _is_tty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
