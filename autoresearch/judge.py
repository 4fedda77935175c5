"""Every verdict of the loop, and the noise floor it weighs differences against.

After each run `Judge.decide` says what it means for the run's config: a crash or a stopped run
as such, the incumbent's own runs keep it, a recheck never moves it, and the rule decides a
challenger: keep, discard or run again. During a run `EarlyStop` decides whether it goes on.
`noise_floor` pools the spread between repeats of one config (and the part of it that comes with
the SEED, for paired comparisons).

Two rules for a challenger:
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

from autoresearch import curves
from autoresearch.protocol import progress_of

SIGMA_FLOOR = 1e-6   # a perfectly repeatable trainer (a fixture) must not divide by zero


@dataclass(frozen=True)
class Verdict:
    status: str      # keep | discard | retest, or crash | pruned for a run that gave no value
    reason: str


class Judge:
    """What both rules share: the verdicts that do not depend on the rule."""
    name = "judge"
    needs_noise_floor = False  # whether the incumbent re-runs until the noise is known

    def decide(self, purpose, outcome, challenger, incumbent, configs):
        """The verdict on the run just finished (`outcome`, a runner.Outcome) of config
        `challenger`, for a job of this `purpose` (schedule.Job); `configs` count that run."""
        if outcome.pruned:
            return Verdict("pruned", outcome.error)
        if not outcome.ok:
            return Verdict("crash", outcome.error)
        if incumbent is None or challenger.id == incumbent.id:
            return Verdict("keep", "the incumbent")
        if purpose == "recheck":  # measures the incumbent; it never moves it
            return Verdict("discard", "not the incumbent")
        return self.verdict(challenger, incumbent, noise_floor(configs))

    def verdict(self, challenger, incumbent, noise):
        raise NotImplementedError


class ThresholdJudge(Judge):
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

    def wants_incumbent_run(self, incumbent, challenger, noise=None):
        return False

    def describe(self):
        return f"threshold: keep one run below the incumbent - {self.min_delta:g}"


class NoiseJudge(Judge):
    """Racing with a t-test on the means (see the module's docstring). Two options make the
    confirmation cost in proportion to the stakes (BENCHMARKS.md, "Replay of real runs"):

    - `first_confidence`: a first run already this far ahead (one-sided, against the
      incumbent's mean and the pooled noise) is kept at once; a challenger many sigma ahead
      needs no repeat, one a hair ahead still races. None: every keep needs `min_runs` runs.
    - `incumbent_rule`: "race" re-runs the incumbent at the start of every race (up to
      `incumbent_runs`); "close" only while its estimate could change the verdict: it stands on
      a single run, or the challenger's t is within one unit of the threshold.
    """
    name = "noise"
    needs_noise_floor = True

    def __init__(self, confidence=0.95, max_runs=3, min_runs=2, drop=0.0, incumbent_runs=6,
                 first_confidence=None, incumbent_rule="race", paired=False):
        if not 0.5 < confidence < 1:
            raise ValueError("confidence must be between 0.5 and 1")
        if not 1 <= min_runs <= max_runs:
            raise ValueError("need 1 <= min_runs <= max_runs")
        if first_confidence is not None and not confidence <= first_confidence < 1:
            raise ValueError("first_confidence must be between confidence and 1")
        if incumbent_rule not in ("race", "close"):
            raise ValueError("incumbent_rule must be race or close")
        self.confidence, self.max_runs, self.min_runs = confidence, max_runs, min_runs
        self.drop, self.incumbent_runs = drop, incumbent_runs
        self.first_confidence, self.incumbent_rule = first_confidence, incumbent_rule
        self.paired = paired

    def test(self, challenger, incumbent, noise, confidence=None):
        """(t statistic, its threshold) for 'the challenger's mean is below the incumbent's'.
        Paired: each run's value less its SEED's shared luck (seed_fit), so runs on
        the same SEEDs are compared without it, with the spread left over."""
        means = [_unlucky_mean(c, noise) for c in (incumbent, challenger)] \
            if self.paired and noise.paired_std is not None else [None]
        if None not in means:
            difference, std, dof = means[0] - means[1], noise.paired_std, noise.paired_dof
        else:
            difference, std, dof = incumbent.mean - challenger.mean, noise.std, noise.dof
        se = max(std, SIGMA_FLOOR) * math.sqrt(1 / challenger.n + 1 / incumbent.n)
        return difference / se, float(stats.t.ppf(confidence or self.confidence, dof))

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
        if n < self.min_runs and self.first_confidence is not None:
            _, first = self.test(challenger, incumbent, noise, self.first_confidence)
            if t >= first:
                return Verdict("keep", f"{where} >= {first:.2f}: far enough ahead on one run")
        if t <= self.drop:
            return Verdict("discard", f"{where}: cannot plausibly beat the incumbent")
        if n >= self.max_runs:
            return Verdict("discard", f"{where} < {needed:.2f} after {n} runs")
        return Verdict("retest", f"{where}: promising, run again")

    def wants_incumbent_run(self, incumbent, challenger, noise=None):
        """At the start of a race (the challenger's first retest), once, up to the cap; under
        the "close" rule only when another incumbent run could change the verdict."""
        if not (incumbent is not None and incumbent.n < self.incumbent_runs
                and incumbent.last_trial < challenger.first_trial):
            return False
        if self.incumbent_rule == "race" or incumbent.n < 2 or noise is None \
                or challenger.mean is None:
            return True
        t, needed = self.test(challenger, incumbent, noise)
        return abs(t - needed) <= 1.0

    def describe(self):
        text = (f"noise: keep when the mean beats the incumbent's at {self.confidence:.0%} "
                f"confidence, {self.min_runs}-{self.max_runs} runs per challenger")
        if self.first_confidence is not None:
            text += f", or at once at {self.first_confidence:.1%}"
        return text


class EarlyStop:
    """The verdict made during a run: stop it when its smoothed train loss at progress p trails
    the incumbent's runs at the same p by more than the noise at p allows.

    The schedules run by progress through the budget, so curves can cross: the loss at p
    predicts the final val_bpb only from the progress on where the replay of real runs showed
    it does (`start`), and a run is stopped only when it is `sigmas` noise units behind, the
    noise at p being the pooled spread between repeats of one config at that p. Nothing is
    stopped before the incumbent has curves at that p and the noise at p is known.
    """

    def __init__(self, start=0.3, sigmas=3.0, checkpoints=None):
        if not 0 < start < 1 or sigmas <= 0:
            raise ValueError("need 0 < start < 1 and sigmas > 0")
        self.start, self.sigmas = start, sigmas
        self.checkpoints = tuple(checkpoints or curves.CHECKPOINTS)

    def reference(self, incumbent_curves, noise_at):
        """{p: (incumbent mean loss, its runs, noise at p)} for the checkpoints this rule may
        stop at: incumbent_curves are {p: loss} of the incumbent's runs, noise_at {p: std}."""
        out = {}
        for p in self.checkpoints:
            if p < self.start - 1e-9 or noise_at.get(p) is None:
                continue
            losses = [c[p] for c in incumbent_curves if c.get(p) is not None]
            if losses:
                out[p] = (sum(losses) / len(losses), len(losses), noise_at[p])
        return out

    def check(self, p, loss, reference):
        """The reason to stop a run at checkpoint p with this smoothed loss, or None."""
        if p not in reference or loss is None:
            return None
        mean, n, std = reference[p]
        allowed = self.sigmas * max(std, SIGMA_FLOOR) * math.sqrt(1 + 1 / n)
        if loss > mean + allowed:
            return (f"pruned at {p:.0%}: loss {loss:.3f}, incumbent {mean:.3f} +- "
                    f"{std:.3f} over {n} run{'s' if n > 1 else ''}")
        return None

    def watch(self, reference, audit=False):
        """A per-line callback for runner.run_trial: the reason to stop, once a checkpoint says
        so. An audit watch never stops: it notes what it would have said and lets the run
        finish, so `report` can tell how often a stop would have cost a keep."""
        return Watch(self, reference, audit)

    def describe(self):
        return (f"stop a run from {self.start:.0%} of its budget on when its loss trails the "
                f"incumbent's by over {self.sigmas:g} sigma")


class Watch:
    """Follows one running trial's progress lines for EarlyStop."""

    def __init__(self, rule, reference, audit=False):
        self.rule, self.reference, self.audit = rule, reference, audit
        self.points, self.checked = [], set()
        self.step, self.progress = 0, 0.0
        self.reason = ""          # why it stopped the run (or, under audit, would have)

    def __call__(self, line):
        p = progress_of(line)
        if p is None:
            return None
        step, progress, loss = p
        self.step, self.progress = step, progress
        if self.reason:       # decided (an audit run goes on; its progress is still followed)
            return None
        if self.points and progress < self.points[-1][0]:  # a new attempt (an OOM retry)
            self.points, self.checked = [], set()
        self.points.append((progress, loss))
        for c in self.reference:
            if c in self.checked or c > progress + 1e-9:
                continue
            self.checked.add(c)
            reason = self.rule.check(c, curves.loss_at(self.points, c), self.reference)
            if reason:
                self.reason = reason
                return None if self.audit else reason
        return None


def _unlucky_mean(config, noise):
    """A config's mean with each run's SEED effect taken out (a SEED the fit has not seen
    counts as average luck); None where its runs' SEEDs are not all known."""
    if len(config.by_seed) != config.n:
        return None
    return sum(v - noise.seed_effects.get(s, 0.0) for s, v in config.by_seed.items()) / config.n


# --- the noise floor: what a verdict weighs a difference against -----------------------------


@dataclass
class Noise:
    std: float        # pooled standard deviation of val_bpb between runs of one config
    dof: int          # its degrees of freedom: runs minus configs
    runs: int
    configs: int
    # The part of each run's luck that comes with its SEED, shared by every config run with it
    # (a two-way fit, config + SEED, over the same runs), and the spread left without it;
    # None until two configs share two SEEDs.
    seed_effects: dict = None
    paired_std: float = None
    paired_dof: int = None


def noise_floor(configs):
    """The pooled standard deviation over every config that ran more than once, or None."""
    repeated = [c for c in configs.values() if c.n > 1]
    groups = [c.values for c in repeated]
    if not groups:
        return None
    squares = sum(sum((v - sum(g) / len(g)) ** 2 for v in g) for g in groups)
    dof = sum(len(g) - 1 for g in groups)
    noise = Noise(math.sqrt(squares / dof), dof, sum(len(g) for g in groups), len(groups))
    fit = seed_fit([c.by_seed for c in repeated])
    if fit is not None:
        noise.seed_effects, noise.paired_std, noise.paired_dof = fit
    return noise


def seed_fit(tables, sweeps=50):
    """Fit value = config mean + SEED effect on {seed: value} tables (one per config, unbalanced:
    each config ran some of the SEEDs) by alternating least squares. Returns (SEED -> effect,
    centred, the residual std, its degrees of freedom: runs - configs - SEEDs + 1), or None
    where the data cannot separate the two (no SEED shared by two configs, or no dof left)."""
    tables = [t for t in tables if len(t) > 1]
    seeds = sorted({s for t in tables for s in t})
    shared = [s for s in seeds if sum(s in t for t in tables) > 1]
    n = sum(len(t) for t in tables)
    dof = n - len(tables) - len(seeds) + 1
    if not shared or dof < 1:
        return None
    effect = dict.fromkeys(seeds, 0.0)
    for _ in range(sweeps):
        means = [sum(v - effect[s] for s, v in t.items()) / len(t) for t in tables]
        for s in seeds:
            residuals = [t[s] - m for t, m in zip(tables, means) if s in t]
            effect[s] = sum(residuals) / len(residuals)
        centre = sum(effect.values()) / len(effect)
        effect = {s: e - centre for s, e in effect.items()}
    means = [sum(v - effect[s] for s, v in t.items()) / len(t) for t in tables]
    squares = sum((v - m - effect[s]) ** 2 for t, m in zip(tables, means) for s, v in t.items())
    return effect, math.sqrt(squares / dof), dof


def make_judge(name="noise", **options):
    if name == "threshold":
        return ThresholdJudge(options.get("min_delta", 0.0))
    if name == "noise":
        return NoiseJudge(**{k: v for k, v in options.items() if k != "min_delta"})
    raise ValueError(f"unknown judge {name!r} (have: noise, threshold)")
