"""The loop itself, shaped like an Optuna Study: ask what to run, run it, tell the outcome.

    driver = Driver(Settings(strategy="greedy"))
    driver.run(trials=10)          # or one run at a time: row = driver.step()

Driver is the front and the factory: it wires one object per job over the standing of the
results (history.Standing: the runs and configs read from the record, the incumbent, the noise),
which it reads afresh after every change and hands to whoever decides:
    schedule.py     what runs next (baseline SEEDs, races, incumbent re-runs, new candidates)
    candidates.py   a valid new candidate (novelty, constraints, memory fit), the proposer told
    workspace.py    train.py as the incumbent (read, restore, keep, commit)
    execute.py      one job's run (sandbox, OOM retry, code-mode contract)
    judge.py        every verdict (Judge.decide) and the noise floor
    stopping.py     the curves of finished runs, the early-stop watch over a challenger
    record.py       the study every run is a trial of; results.tsv its view
    trialdir.py     runs/<trial>/;  progress.py the bar and trial lines;  recheck.py
`tell()` asks the judge for a verdict, moves the ratchet (train.py always holds the incumbent)
and writes the row. loop.py and the notebook both drive this class.
"""
import os
import socket
import time

import prepare
from autoresearch import history, trialdir
from autoresearch import ledger as ledger_mod
from autoresearch import recheck as recheck_mod
from autoresearch.candidates import Candidates
from autoresearch.config import Settings, time_budget
from autoresearch.errors import LoopError
from autoresearch.execute import Execution
from autoresearch.judge import make_judge, noise_floor
from autoresearch.patch import read_constants
from autoresearch.progress import Progress, trial_line
from autoresearch.proposers import LLM_STRATEGIES, make_proposer
from autoresearch.ratchet import GitRatchet, RatchetError
from autoresearch.record import Record, optuna_distributions, reporter
from autoresearch.runner import Outcome
from autoresearch.schedule import Job, Schedule
from autoresearch.space import load_space
from autoresearch.stopping import Stopping, watched
from autoresearch.workspace import Workspace, constraint_context


__all__ = ["Driver", "Job", "LoopError", "Settings", "default_worker"]  # (the last three: moved)


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
        seed = self._load_space()
        self._make_judge_and_proposer()
        if settings.baseline_runs < 1:
            raise LoopError("--baseline-runs must be at least 1")
        self.code_mode = self.proposer.edits_code
        self._bind_budget(settings.time_budget or time_budget())
        self.worker = settings.worker or default_worker(settings.worker_slot)
        try:
            ratchet = GitRatchet(self.train_path, settings.tag, log) if settings.git else None
        except RatchetError as e:
            raise LoopError(str(e)) from None
        self.workspace = Workspace(self.train_path, self.results_dir, self.profile, self.names,
                                   self.record, self.code_mode, ratchet, log)
        self.candidates = Candidates(settings, self.space, self.proposer, self.workspace,
                                     self.stopping)
        self.schedule = Schedule(settings, self.judge, self.workspace, self.candidates,
                                 self.record, self.worker, log)
        standing = self.reload()
        self.schedule.start(standing, seed)
        self.workspace.restore(self.incumbent, self.runs, self.base_seed)
        if not settings.dry_run:
            written = self.workspace.write_defaults()
            if written:
                log(f"train.py: wrote the {self.profile.name} profile's values in for "
                    f"{len(written)} constant(s) that said None, so it shows the recipe that "
                    f"runs ({', '.join(written)})")
        self.candidates.start(standing)

    def _load_space(self):
        """The search space, checked against train.py; returns train.py's SEED."""
        settings = self.s
        try:
            with open(self.train_path) as f:
                source = f.read()
        except FileNotFoundError:
            raise LoopError(f"no {self.train_path}") from None
        self.space = load_space(settings.space_path, self.profile.name,
                                constraint_context(source, self.profile))
        if "SEED" in self.space.params:
            raise LoopError(f"{settings.space_path}: SEED cannot be searched: a config's re-runs "
                            f"vary SEED themselves, and a kept seed change is luck, not a recipe")
        seed = read_constants(source).get("SEED")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise LoopError(f"{self.train_path} needs an integer literal SEED: re-runs of a "
                            f"config change it")
        self.names = list(self.space.params)
        return seed

    def _make_judge_and_proposer(self):
        settings = self.s
        try:
            self.judge = make_judge(settings.judge, confidence=settings.confidence,
                                    max_runs=settings.max_runs, min_delta=settings.min_delta,
                                    min_runs=min(2, settings.max_runs), drop=settings.drop,
                                    first_confidence=settings.first_confidence,
                                    incumbent_rule=settings.incumbent_rule,
                                    paired=settings.paired)
            llm = dict(settings.llm, log=self.log) if settings.strategy in LLM_STRATEGIES \
                else settings.llm
            self.proposer = make_proposer(settings.strategy, self.space, settings.seed, llm)
            self.stopping = Stopping(settings, self.results_dir)
        except ValueError as e:
            raise LoopError(str(e)) from None

    def _bind_budget(self, asked):
        settings = self.s
        self.record = self._open_record(asked)
        # The budget is part of what makes runs comparable: a results file (or a study) keeps
        # the one it was started with (a resume needs no --budget), and refuses another.
        budget = asked or self.record.recorded().get("time_budget") or self.profile.time_budget
        self.record.bind(self.profile.name, self.data.meta["name"], float(budget))
        self.budget = float(budget)
        self.stopping.bind(self.record, self.budget)
        self.execution = Execution(settings, self.data, self.budget, self.results_dir, self.log)

    def _open_record(self, budget):
        """The study every run is a trial of (record.py), seeded with an older results.tsv on
        its first start."""
        s = self.s
        limit = (budget or self.profile.time_budget) + (s.grace if s.grace is not None else 60.0)
        try:
            record = Record(
                s.results_path, s.storage, s.study, dry=s.dry_run,
                # any worker may fail a trial held this long (a hung trainer, OOM retries)
                timeout=limit * (s.oom_retries + 1) + 120,
                distributions=optuna_distributions(self.space),
                heartbeat_seconds=s.heartbeat_seconds, grace=s.lost_after)
        except ValueError as e:
            raise LoopError(str(e)) from None
        imported = record.import_results()
        if imported:
            self.log(f"study {s.study!r} in {record.location}: started from the {imported} "
                     f"run(s) of {record.path} (kept as {record.path}.imported)")
        return record

    # --- what the results say -----------------------------------------------------------------

    def reload(self):
        """The standing of the results, read afresh from the record (other workers' runs and
        jobs included); returns it."""
        # other workers' jobs are running() (a shared study)
        self.standing = history.Standing.of(self.record.rows(), self.record.running(),
                                            self.space, noise_floor)
        return self.standing

    # what the results say, as of the last reload
    rows = property(lambda self: self.standing.rows)
    running = property(lambda self: self.standing.running)
    runs = property(lambda self: self.standing.runs)
    configs = property(lambda self: self.standing.configs)
    incumbent = property(lambda self: self.standing.incumbent)
    noise = property(lambda self: self.standing.noise)
    base_seed = property(lambda self: self.schedule.base_seed)

    def best(self):
        """(the incumbent's searched values, its mean val_bpb), or train.py's before any run."""
        return self.candidates.best(self.standing)

    def baseline(self):
        return self.schedule.baseline(self.standing)

    def baseline_runs_left(self):
        """How many baseline runs are still to come before the first verdict."""
        return self.schedule.baseline_runs_left(self.standing)

    def dry_run(self, n):
        """The next n new candidates the proposer would run from the incumbent; runs nothing."""
        return self.candidates.dry_run(n, self.standing)

    # --- tell ---------------------------------------------------------------------------------

    def tell(self, job, trial, outcome, source, note="", started=None, oom_retry=None):
        """Judge the run, move the ratchet, write the row; returns (row, verdict reason).
        oom_retry: (first, final) DEVICE_BATCH_SIZE where an OOM retry shrank it."""
        self.reload()  # other workers' runs since this one started count in its verdict
        ws = self.workspace
        params = ws.searched(source)
        config = job.config if params == job.params else ws.config_of(params, source)
        note = "; ".join(filter(None, [history.oom_note(oom_retry), note]))
        description = f"{job.description} ({note})" if note else job.description
        row = self._row(job, trial, outcome, params, config, description, started)
        row |= {"kind": job.kind, "oom_retry": list(oom_retry) if oom_retry else None,
                "code": ws.fingerprint(source) if source is not None else ""}
        provisional = "discard" if outcome.ok else "pruned" if outcome.pruned else "crash"
        run = history.Run(trial, provisional,  # provisional status
                          row["val_bpb"] if outcome.ok else None, params, config, job.seed,
                          job.strategy, job.kind, description, outcome.error, oom_retry, row)
        after = history.configs_of(self.runs + [run])
        mine, inc = after[config], self.incumbent and after[self.incumbent.id]
        verdict = self.judge.decide(job.purpose, outcome, mine, inc, after)
        status, reason = verdict.status, verdict.reason
        row["status"] = status
        row["runs"] = mine.n
        row["mean_bpb"] = mine.mean if status not in ("crash", "pruned") and mine.mean is not None \
            else 0.0
        moved = status == "keep" and (inc is None or config != inc.id)
        if moved:
            ws.keep(source, self.base_seed)
        row["commit"] = ws.commit(source, moved, f"val_bpb {mine.mean or 0:.6f} over {mine.n} "
                                                 f"runs: {description}")
        self.record.finish(trial, row, self._details(job, trial, outcome, source, reason))
        self.reload()
        self.candidates.tell(job, config, status, self.configs)
        return row, reason

    def _row(self, job, trial, outcome, params, config, description, started):
        """The results row of a run, its status still to be decided."""
        summary = outcome.summary
        return {
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

    def _details(self, job, trial, outcome, source, reason):
        """What the study's trial carries for a person to open (optuna-dashboard shows user
        attributes): the verdict, the race, the log's tail and train.py against the baseline."""
        details = {"verdict": reason or "", "purpose": job.purpose,
                   "log_tail": trialdir.tail(outcome.log)}
        baseline = self.baseline()
        if baseline is not None and baseline.id != job.config:
            first = next(r for r in self.runs if r.config == baseline.id)
            base_source = trialdir.read_source(self.results_dir, first.row.get("log"))
            if base_source is not None and source is not None:
                details["diff"] = trialdir.diff(base_source, source, "baseline", f"trial {trial}")
        return details

    def close(self):
        """Stop the study's heartbeats."""
        self.record.close()

    # --- driving ------------------------------------------------------------------------------

    def step(self, on_line=None):
        """Ask, run and tell one run; returns the row written."""
        return self._step(on_line)[0]

    def _step(self, on_line=None):
        job, trial = self.schedule.reserve(self.standing, self.reload)
        started = ledger_mod.now_iso()
        watch = self.stopping.watch(job, trial, self.runs, self.configs, self.incumbent)
        try:
            outcome, source, oom_retry = self.execution.run(
                trial, job, watched(on_line, watch, reporter(self.record, trial)))
            note = self.stopping.after(outcome, watch) if watch is not None else ""
            if job.purpose == "new" and job.candidate is not None \
                    and job.candidate.cost:  # once per proposal, not per re-run
                trialdir.write_proposal(self.results_dir, trial, job.candidate.cost)
        except BaseException:
            # never leave a reserved trial without its row (Ctrl-C outside the trainer, a bug)
            self.tell(job, trial, Outcome(False, "interrupted"), job.source, "", started)
            raise
        row, reason = self.tell(job, trial, outcome, source, note, started, oom_retry)
        if outcome.error == "interrupted":
            raise KeyboardInterrupt
        if job.purpose == "baseline" and row["status"] == "crash" and len(self.configs) == 1 \
                and not self.configs[row["config"]].n:
            raise LoopError(f"the baseline crashed ({outcome.error}); see {outcome.log}")
        return row, reason, job

    def run(self, trials=None, hours=None, progress=True):
        """Runs until `trials` more have run (every run counts: baseline repeats and re-runs
        too), `hours` have passed, or Ctrl-C."""
        deadline = time.time() + hours * 3600 if hours else None
        bar = Progress(trials, progress, lambda: self.best()[1])
        done = []
        try:
            while (trials is None or len(done) < trials) and (deadline is None or time.time() < deadline):
                row, reason, job = self._step(bar.on_line)
                done.append(row)
                line = self.trial_line(row, reason)
                bar.finished(row, line if self.s.worker_slot is None else f"[{self.worker}] {line}")
        finally:
            bar.close()
        return done

    def trial_line(self, row, reason=""):
        """One line per run: its status and value, its config and where its race stands."""
        return trial_line(row, self.incumbent, reason)

    def recheck(self, runs=3, on_line=None):
        """Re-run the baseline and the incumbent `runs` times each with fresh SEEDs
        (recheck.py); returns how much of the recorded gain survives."""
        return recheck_mod.recheck(self, runs, on_line)
