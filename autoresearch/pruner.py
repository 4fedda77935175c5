"""The stopping rule (judge.EarlyStop) as an Optuna pruner, for a record kept as an Optuna study.

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
import optuna

from autoresearch import curves


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
