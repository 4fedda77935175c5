"""Stopping hopeless runs: the curves of finished runs (read once, through trialdir) and the watch
(judge.EarlyStop, or an Optuna pruner: pruner.py) over a challenger's run. A part of the Driver
(driver.py), which holds the state it reads: stopper, pruner, record, runs, configs, incumbent,
budget, results_dir.
"""
import random

from autoresearch import curves, trialdir
from autoresearch.pruner import PrunerWatch


class Stopping:
    """Mixed into Driver: its methods use the driver's state (see the module's docstring)."""

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

    def checkpoints_of(self, run):
        """{progress: smoothed loss} of a run at curves.CHECKPOINTS ({} without a log here)."""
        curve = self.curve_of(run)
        if curve is None or not curve.checkpoints:
            return {}
        return {p: v for p, v in zip(curves.CHECKPOINTS, curve.checkpoints) if v is not None}

    def early_stop(self, job, trial):
        """The watch that may stop this job's run (judge.EarlyStop), or None: only a challenger's
        first run is stopped (its race's re-runs too with prune_reruns), never the baseline,
        the incumbent or a recheck, and only at checkpoints where the incumbent has curves and
        the noise is known. A re-run is spared because its config already earned it: its
        first run led or came close, and one bad curve would end the race on the noisiest
        evidence there is."""
        stoppable = ("new", "retest") if self.s.prune_reruns else ("new",)
        if self.stopper is None and self.pruner is None or job.purpose not in stoppable \
                or self.incumbent is None or job.config == self.incumbent.id:
            return None
        audit = random.Random(f"{self.s.seed}:{trial}").random() < self.s.audit
        if self.pruner is not None:  # Optuna's, over the study's curves
            return PrunerWatch(self.s.prune, self.pruner, self.record.optuna_study(),
                               lambda: self.record.trial(trial), audit)
        noise_at = curves.noise_at([[self.checkpoints_of(r) for r in self.runs
                                     if r.config == c.id and r.finished]
                                    for c in self.configs.values() if c.n > 1])
        mine = [self.checkpoints_of(r) for r in self.runs
                if r.config == self.incumbent.id and r.finished]
        reference = self.stopper.reference([m for m in mine if m], noise_at)
        if not reference:
            return None
        return self.stopper.watch(reference, audit)

    def _after_watch(self, outcome, watch, note):
        """A stopped run's row shows what it used; an audited run says what it escaped."""
        if outcome.pruned:
            outcome.summary = {"training_seconds": watch.progress * self.budget,
                               "total_seconds": outcome.wall_seconds, "num_steps": watch.step}
        elif watch.audit and watch.reason and outcome.ok:
            note = "; ".join(filter(None, [note, f"audit: would have been {watch.reason}"]))
        return note


def watched(on_line, watch, report=None):
    """One per-line callback for the runner: the progress display, the record's curve, then the
    early-stop watch (whose answer, a reason to stop, is what the runner acts on)."""
    def each(line):
        if on_line is not None:
            on_line(line)
        if report is not None:
            report(line)
        return watch(line) if watch is not None else None
    return each
