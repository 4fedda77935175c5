"""Keep, discard or run again: the verdict on a challenger config after each of its runs.

Two judges:
- `ThresholdJudge` (`--judge threshold`): Karpathy's rule. One run that beats the incumbent's
  value by more than min_delta is kept. Cheap and easily fooled by a lucky seed.
- `NoiseJudge` (`--judge noise`, the default): racing, as SMAC's intensification does. A
  challenger whose first run cannot plausibly beat the incumbent is discarded at once; one that
  might is re-run with fresh SEEDs, and kept only when its *mean* beats the incumbent's mean with
  the confidence asked for: a one-sided t-test on the difference of means, with the pooled noise
  floor (and its degrees of freedom) and both run counts. The incumbent gets a re-run at the start of each race
  (up to a cap), so its own estimate sharpens and a lucky keep regresses toward its true value.
"""
import math
from dataclasses import dataclass

from scipy import stats

SIGMA_FLOOR = 1e-6   # a perfectly repeatable trainer (a fixture) must not divide by zero


@dataclass(frozen=True)
class Verdict:
    status: str      # keep | discard | retest
    reason: str


class ThresholdJudge:
    name = "threshold"

    def __init__(self, min_delta=0.0):
        if min_delta < 0:
            raise ValueError("min_delta must be >= 0")
        self.min_delta = min_delta

    def verdict(self, challenger, incumbent, noise):
        value = challenger.values[-1]
        if incumbent is None or incumbent.mean is None:
            return Verdict("keep", "nothing to beat yet")
        if value < incumbent.mean - self.min_delta:
            return Verdict("keep", f"{value:.6f} < {incumbent.mean:.6f} - {self.min_delta:g}")
        return Verdict("discard", f"{value:.6f} does not beat {incumbent.mean:.6f}")

    def wants_incumbent_run(self, incumbent, challenger):
        return False

    def describe(self):
        return f"threshold: keep one run below the incumbent - {self.min_delta:g}"


class NoiseJudge:
    name = "noise"

    def __init__(self, confidence=0.95, max_runs=3, min_runs=2, drop=0.0, incumbent_runs=6):
        if not 0.5 < confidence < 1:
            raise ValueError("confidence must be between 0.5 and 1")
        if not 1 <= min_runs <= max_runs:
            raise ValueError("need 1 <= min_runs <= max_runs")
        self.confidence, self.max_runs, self.min_runs = confidence, max_runs, min_runs
        self.drop, self.incumbent_runs = drop, incumbent_runs

    def test(self, challenger, incumbent, noise):
        """(t statistic, its threshold) for 'the challenger's mean is below the incumbent's'."""
        se = max(noise.std, SIGMA_FLOOR) * math.sqrt(1 / challenger.n + 1 / incumbent.n)
        t = (incumbent.mean - challenger.mean) / se
        return t, float(stats.t.ppf(self.confidence, noise.dof))

    def verdict(self, challenger, incumbent, noise):
        n = challenger.n
        if incumbent is None or incumbent.mean is None:
            return Verdict("keep", "nothing to beat yet")
        if noise is None:  # no config has run twice yet: only more runs can tell
            if n < self.max_runs:
                return Verdict("retest", "noise floor unknown")
            return Verdict("discard", "noise floor still unknown")
        t, needed = self.test(challenger, incumbent, noise)
        where = (f"mean {challenger.mean:.6f} over {n} vs {incumbent.mean:.6f} over "
                 f"{incumbent.n}, t {t:+.2f}")
        if t >= needed and n >= self.min_runs:
            return Verdict("keep", f"{where} >= {needed:.2f}")
        if t <= self.drop:
            return Verdict("discard", f"{where}: cannot plausibly beat the incumbent")
        if n >= self.max_runs:
            return Verdict("discard", f"{where} < {needed:.2f} after {n} runs")
        return Verdict("retest", f"{where}: promising, run again")

    def wants_incumbent_run(self, incumbent, challenger):
        """At the start of a race (the challenger's first retest), once, up to the cap."""
        return (incumbent is not None and incumbent.n < self.incumbent_runs
                and incumbent.last_trial < challenger.first_trial)

    def describe(self):
        return (f"noise: keep when the mean beats the incumbent's at {self.confidence:.0%} "
                f"confidence, {self.min_runs}-{self.max_runs} runs per challenger")


def make_judge(name="noise", **options):
    if name == "threshold":
        return ThresholdJudge(options.get("min_delta", 0.0))
    if name == "noise":
        return NoiseJudge(**{k: v for k, v in options.items() if k != "min_delta"})
    raise ValueError(f"unknown judge {name!r} (have: noise, threshold)")
