"""Stopping rules over the study's curves: ours (judge.EarlyStop) as an Optuna pruner, and
Optuna's own pruners (median, wilcoxon) as watches over a running trial in the loop
(`--prune median|wilcoxon`), so that each can be compared with the loop's rule.

Each run reports its training curve as intermediate values: step = percent of the budget,
value = the smoothed train loss of its progress lines. The incumbent's trials carry the user
attribute `incumbent` (true), every trial its `config`. Then

    study = optuna.create_study(pruner=EarlyStopPruner(EarlyStop(start=0.3, sigmas=3)))
    ...
    trial.report(loss, step=40)
    if trial.should_prune(): ...

asks the same question the loop asks of a running trial: does it trail the incumbent's runs at
the same progress by more than the noise there (pooled over the configs run more than once)
allows? Optuna's own pruners (MedianPruner, WilcoxonPruner) read the same values, so they can
be compared with this one on the same study.
"""
import warnings

import optuna

from autoresearch import curves
from autoresearch.protocol import progress_of

OPTUNA_PRUNERS = ("median", "wilcoxon")


def optuna_pruner(name, start):
    """Optuna's pruner `name`, silent before `start` (a fraction of the budget, as ours)."""
    warmup = round(100 * start)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=warmup)
    if name == "wilcoxon":
        with warnings.catch_warnings():  # "experimental" since Optuna 3.6
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=warmup)
    raise ValueError(f"unknown pruner {name!r} (have: {', '.join(OPTUNA_PRUNERS)})")


class PrunerWatch:
    """A running trial's watch (the interface of judge.Watch) that asks an Optuna pruner at
    each of curves.CHECKPOINTS whether to stop, over the points the record has reported.
    `trial_of()` gives the trial as the study holds it now (a FrozenTrial)."""

    def __init__(self, name, pruner, study, trial_of, audit=False):
        self.name, self.pruner, self.study, self.trial_of = name, pruner, study, trial_of
        self.audit = audit
        self.checked = set()
        self.step, self.progress = 0, 0.0
        self.reason = ""

    def __call__(self, line):
        p = progress_of(line)
        if p is None:
            return None
        step, progress, loss = p
        if progress < self.progress:  # a new attempt (an OOM retry)
            self.checked = set()
        self.step, self.progress = step, progress
        if self.reason:
            return None
        for c in curves.CHECKPOINTS:
            if c in self.checked or c > progress + 1e-9:
                continue
            self.checked.add(c)
            trial = self.trial_of()
            if trial.last_step is not None and self.pruner.prune(self.study, trial):
                self.reason = (f"pruned at {c:.0%}: loss {loss:.3f}, by Optuna's {self.name} "
                               f"pruner")
                return None if self.audit else self.reason
        return None


class EarlyStopPruner(optuna.pruners.BasePruner):
    def __init__(self, rule):
        self.rule = rule

    def prune(self, study, trial):
        step = trial.last_step
        if step is None:
            return False
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        reference = self.rule.reference(
            [_checkpoints(t) for t in done if t.user_attrs.get("incumbent")],
            curves.noise_at(_groups(done)))
        p = round(step / 100, 2)
        return self.rule.check(p, trial.intermediate_values[step], reference) is not None


def _checkpoints(trial):
    """{progress: loss} of a trial at curves.CHECKPOINTS, from its intermediate values."""
    points = sorted((step / 100, v) for step, v in trial.intermediate_values.items())
    if not points:
        return {}
    return {p: curves.loss_at(points, p) for p in curves.CHECKPOINTS
            if curves.loss_at(points, p) is not None}


def _groups(trials):
    by_config = {}
    for t in trials:
        by_config.setdefault(t.user_attrs.get("config"), []).append(_checkpoints(t))
    return [g for config, g in by_config.items() if config is not None and len(g) > 1]
