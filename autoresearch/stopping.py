"""Stopping hopeless runs: the curves of finished runs (read once, through trialdir) and the watch
(judge.EarlyStop, or an Optuna pruner: pruner.py) over a challenger's run. The Driver holds one
`Stopping` and hands it what the results say (runs, configs, the incumbent) when a run starts.
"""
import random

from autoresearch import curves, trialdir
from autoresearch.judge import EarlyStop
from autoresearch.pruner import OPTUNA_PRUNERS, PrunerWatch, optuna_pruner


class Stopping:
    """The stopping rule a loop was started with (settings.prune: on, off or one of Optuna's
    pruners), over the record its runs' curves are reported to."""

    def __init__(self, settings, results_dir):
        if settings.prune not in ("on", "off", *OPTUNA_PRUNERS):
            raise ValueError(f"prune must be on or off (or one of Optuna's: "
                             f"{', '.join(OPTUNA_PRUNERS)}), not {settings.prune!r}")
        if not 0 <= settings.audit < 1:
            raise ValueError("the audit share must be at least 0 and below 1")
        self.s, self.results_dir = settings, results_dir
        self.record, self.budget = None, None  # bind(): once the record is open
        self.stopper = EarlyStop(settings.prune_start, settings.prune_sigmas) \
            if settings.prune == "on" else None
        self.pruner = optuna_pruner(settings.prune, settings.prune_start) \
            if settings.prune in OPTUNA_PRUNERS else None
        self._curves = {}  # trial -> curves.Curve of a finished run, read once

    def bind(self, record, budget):
        """The record the runs' curves go to (Optuna's pruners read them there) and the budget
        a stopped run's training seconds are counted in."""
        self.record, self.budget = record, budget

    def describe(self):
        return self.stopper.describe() if self.stopper is not None else \
            f"Optuna's {self.s.prune} pruner" if self.pruner is not None else "off"

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

    def watch(self, job, trial, runs, configs, incumbent):
        """The watch that may stop this job's run (judge.EarlyStop), or None: only a challenger's
        first run is stopped (its race's re-runs too with prune_reruns), never the baseline,
        the incumbent or a recheck, and only at checkpoints where the incumbent has curves and
        the noise is known. A re-run is spared because its config already earned it: its
        first run led or came close, and one bad curve would end the race on the noisiest
        evidence there is."""
        stoppable = ("new", "retest") if self.s.prune_reruns else ("new",)
        if self.stopper is None and self.pruner is None or job.purpose not in stoppable \
                or incumbent is None or job.config == incumbent.id:
            return None
        audit = random.Random(f"{self.s.seed}:{trial}").random() < self.s.audit
        if self.pruner is not None:  # Optuna's, over the study's curves
            return PrunerWatch(self.s.prune, self.pruner, self.record.optuna_study(),
                               lambda: self.record.trial(trial), audit)
        noise_at = curves.noise_at([[self.checkpoints_of(r) for r in runs
                                     if r.config == c.id and r.finished]
                                    for c in configs.values() if c.n > 1])
        mine = [self.checkpoints_of(r) for r in runs if r.config == incumbent.id and r.finished]
        reference = self.stopper.reference([m for m in mine if m], noise_at)
        if not reference:
            return None
        return self.stopper.watch(reference, audit)

    def after(self, outcome, watch):
        """A stopped run's row shows what it used; an audited run says what it escaped (the
        note for its description, else "")."""
        if outcome.pruned:
            outcome.summary = {"training_seconds": watch.progress * self.budget,
                               "total_seconds": outcome.wall_seconds, "num_steps": watch.step}
        elif watch.audit and watch.reason and outcome.ok:
            return f"audit: would have been {watch.reason}"
        return ""


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
