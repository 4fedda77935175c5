"""Running one job: in the sandbox chosen at the first trial, retried with half the micro-batch on
out of memory, and, for a code edit, held to the contract (budget, profile). The Driver holds one
`Execution`, made once the run budget is known.
"""
import os

from autoresearch import edits, protocol, trialdir
from autoresearch import sandbox as sandbox_mod
from autoresearch.config import TIME_BUDGET_ENV, fixed_steps
from autoresearch.errors import LoopError
from autoresearch.patch import patch_constants
from autoresearch.runner import Outcome, run_trial
from autoresearch.workspace import effective_constants


class Execution:
    """How this loop's trials run: the trainer (settings.run_fn, default runner.run_trial), the
    budget and the time limit past it, the trainer's environment, the sandbox, OOM retries."""

    def __init__(self, settings, data, budget, results_dir, log=print):
        self.s, self.data, self.profile = settings, data, data.profile
        self.results_dir, self.log = results_dir, log
        self.run_fn = settings.run_fn or run_trial
        self.budget = budget
        self.time_limit = budget + (settings.grace if settings.grace is not None
                                    else max(60.0, 0.5 * budget))
        self.trainer_env = dict(settings.trainer_env)
        if budget != self.profile.time_budget:
            self.trainer_env[TIME_BUDGET_ENV] = f"{budget:g}"
        self._sandbox = None  # chosen (and announced) when the first trial runs

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

    def run(self, trial, job, on_line=None):
        """Train the job's source in runs/<trial>/, retrying with half the micro-batch on OOM.
        Returns (outcome, the source that ran last, (first, final) DEVICE_BATCH_SIZE where a
        retry shrank it, else None)."""
        trial_dir = trialdir.fresh(self.results_dir, trial)
        source = job.source
        first_micro = micro = effective_constants(source, self.profile).get("DEVICE_BATCH_SIZE")
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
        if job.kind == "code":
            outcome = self._check_code_trial(outcome, job)
        return outcome, source, (first_micro, micro) if micro != first_micro else None

    def _check_code_trial(self, outcome, job):
        """Save a code edit's diff beside its log; a summary that breaks the contract (past the
        budget, another profile) makes the trial a crash, never a keep."""
        diff = job.candidate.diff if job.candidate is not None else ""
        if outcome.log and diff:
            trialdir.write_diff(outcome.log, diff)
        by_steps = fixed_steps(self.trainer_env)
        if not outcome.ok or by_steps:  # a run of fixed steps has no budget to keep
            return outcome
        broken = edits.contract_violation(outcome.summary, self.budget, self.profile.name)
        if broken is None:
            return outcome
        return Outcome(False, protocol.contract(broken), {}, outcome.returncode,
                       outcome.wall_seconds, outcome.log)
