"""What the night so far says about the next challenger: a prior over how far it is ahead.

A fixed confidence asks every challenger for the same evidence. But the evidence a keep needs
for a given share of false keeps depends on how many challengers are truly better, and by how
much: early in a night many proposals beat the incumbent by several sigma, and one run says so;
late, most are worse or within the noise, and a run that looks ahead is most often luck. The
night's own challengers tell which phase it is in. Each one's first run, against the incumbent
of its time, is a noisy draw of the advantage a proposal brings; deconvolving the noise from
the latest of them (empirical Bayes: the nonparametric maximum-likelihood prior on a grid,
fitted by EM) gives the share and spread of advantages the proposer is producing now. The judge
then asks the posterior probability that a challenger is ahead, given its runs and that prior.

The noise is taken as normal with a known spread. The noise floor is estimated from a few
repeats, so the judge widens it by the t-test's factor at the confidence asked for
(`widened`): under a flat prior the verdict at that confidence is then exactly the t-test's,
which is also what the judge uses until the night has shown a few challengers (`MIN_GAPS`).
(A t-distributed likelihood instead would let its heavy tails hand a run ten sigma ahead back
to the prior.)
"""
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

MIN_GAPS = 3        # challengers seen before the night's prior replaces the flat one
GRID = 121          # points of the prior's grid
PSEUDO = 1.0        # weight of a flat prior over the grid mixed in (no point gets zero mass)
NULL = 0.0          # weight of a tie (delta = 0) mixed in: a change most often does nothing


@dataclass(frozen=True)
class Gap:
    """A challenger's first run against the incumbent of its time (positive: it was ahead)."""
    value: float | None      # incumbent mean - the run's val_bpb; None for a stopped run
    incumbent_runs: int      # the runs behind the incumbent's mean then


def widened(std, dof, confidence):
    """The noise floor's std times the t-test's factor over the normal one at `confidence`."""
    return std * float(stats.t.ppf(confidence, dof) / stats.norm.ppf(confidence))


def gaps(runs, exclude=None, window=12):
    """The `window` latest challengers' first runs (history.Run, any order) as Gaps, leaving
    out config `exclude` (the one being judged: its own runs are the likelihood, not the
    prior). A stopped first run counts as one that was behind, by how much unknown."""
    values, incumbent, seen, out = {}, None, set(), []
    for run in sorted(runs, key=lambda r: r.trial):
        is_new = run.kind in ("params", "code") and run.config not in seen
        if is_new and incumbent is not None and run.config != incumbent \
                and run.config != exclude and values.get(incumbent) \
                and (run.finished or run.status == "pruned"):
            inc = values[incumbent]
            value = sum(inc) / len(inc) - run.value if run.finished else None
            out.append(Gap(value, len(inc)))
        if run.finished or run.status == "pruned":
            seen.add(run.config)
        if run.finished and run.kind != "recheck":
            values.setdefault(run.config, []).append(run.value)
        if run.status == "keep":
            incumbent = run.config
    return out[-window:] if window else out


class Prior:
    """A discrete prior over the advantage delta (incumbent's true value - challenger's)."""

    def __init__(self, points, weights):
        self.points, self.weights = np.asarray(points, float), np.asarray(weights, float)

    @classmethod
    def fit(cls, observed, std, iterations=300):
        """The maximum-likelihood prior (mixed with PSEUDO of a flat one) of the Gaps `observed`,
        each measured with normal noise of std * sqrt(1 + 1/incumbent runs)."""
        scale = np.array([std * math.sqrt(1 + 1 / g.incumbent_runs) for g in observed])
        seen = [abs(g.value) for g in observed if g.value is not None]
        reach = max(seen, default=0.0) + 4 * float(scale.max())
        points = np.linspace(-reach, reach, GRID)
        like = np.empty((len(observed), GRID))
        for k, (g, s) in enumerate(zip(observed, scale)):
            if g.value is None:  # stopped: it was behind
                like[k] = stats.norm.cdf(-points / s)
            else:
                like[k] = stats.norm.pdf((g.value - points) / s) / s
        base = np.full(GRID, PSEUDO / GRID)
        base[GRID // 2] += NULL          # the grid is symmetric and odd: its middle is 0
        weights = np.full(GRID, 1.0 / GRID)
        for _ in range(iterations):
            joint = like * weights
            joint /= np.maximum(joint.sum(axis=1, keepdims=True), 1e-300)
            weights = (joint.sum(axis=0) + base) / (len(observed) + PSEUDO + NULL)
        return cls(points, weights)

    def ahead(self, difference, se):
        """(P(delta > 0), posterior mean / posterior std) given a difference of means
        (incumbent - challenger) measured with standard error se."""
        post = self.weights * stats.norm.pdf((difference - self.points) / se)
        total = post.sum()
        if not total > 0:   # the difference lies far beyond the grid: it says so alone
            return (1.0, math.inf) if difference > 0 else (0.0, -math.inf)
        post /= total
        mean = float(post @ self.points)
        spread = math.sqrt(max(float(post @ (self.points - mean) ** 2), 1e-24))
        return float(post[self.points > 0].sum()), mean / spread

    def share_ahead(self):
        """The prior's share of challengers truly ahead: how rich the night is now."""
        return float(self.weights[self.points > 0].sum())
