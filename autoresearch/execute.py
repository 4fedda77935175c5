"""Running one job: in the sandbox chosen at the first trial, retried with half the micro-batch on
out of memory, and, for a code edit, held to the contract (budget, profile). A part of the Driver
(driver.py), which holds the state it reads: s, run_fn, time_limit, data, trainer_env, budget.
"""
import os

from autoresearch import edits, protocol, trialdir
from autoresearch import sandbox as sandbox_mod
from autoresearch.config import fixed_steps
from autoresearch.errors import LoopError
from autoresearch.patch import patch_constants
from autoresearch.runner import Outcome


class Execution:
    """Mixed into Driver: its methods use the driver's state (see the module's docstring)."""

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
        return Outcome(False, protocol.contract(broken), {}, outcome.returncode,
                       outcome.wall_seconds, outcome.log)

    def _keep_proposal(self, trial, meta):
        """What an LLM proposal cost (tokens, seconds, format, valid/repaired/fallback), as
        runs/<trial>/proposal.json: `loop.py report` sums it per strategy."""
        trialdir.write_proposal(self.results_dir, trial, {k: v for k, v in meta.items()
                                                          if k != "diff"})
