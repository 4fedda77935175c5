"""A run's training curve in a few numbers, and what its shape says, for the LLM to read.

train.py prints progress lines (`step N | progress P | loss L | ... | tok/s X | ...`, loss
already smoothed) at least every 2% of the budget. From them a run gets its loss at 10, 25, 50,
75 and 100% of the budget, its steps and its typical tokens/s, and one signal:

- `diverging`: the run failed with nan/diverged, or its loss ended well above the lowest it
  reached and rose over the last quarter;
- `noisy`: over the second half the loss went up and down by much more than it went down;
- `improving`: the last quarter of the budget still lowered the loss by over 1% (the run was
  still learning when time ran out: more steps, a smaller model or a higher learning rate may
  pay);
- `plateaued`: the last quarter changed the loss by 1% or less (the budget was not the limit).

A run with fewer than 4 progress lines gets no signal. The text form is one line per run, the
fractions said once in LEGEND:

    loss 7.62 7.30 6.51 6.16 5.89, 17 steps, 1.2k tok/s, improving
"""
import math
import statistics
from dataclasses import asdict, dataclass, field

from autoresearch import protocol

FRACTIONS = (0.10, 0.25, 0.50, 0.75, 1.00)
# Where a running trial is compared with the incumbent's runs (judge.EarlyStop).
CHECKPOINTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
LEGEND = ("curve: smoothed train loss at 10, 25, 50, 75 and 100% of the time budget (- where the "
          "run stopped before), steps, tokens/s, and the curve's shape")
SIGNALS = ("improving", "plateaued", "noisy", "diverging")
IMPROVING = 0.01     # last quarter's drop, relative to the final loss, that counts as improving
NOISY = 3.0          # second half: total up-and-down movement over the net drop
DIVERGING = 0.02     # final loss above the lowest, relative to it


@dataclass
class Curve:
    losses: list = field(default_factory=list)  # the smoothed loss at each of FRACTIONS (None where unknown)
    steps: int = 0
    tok_s: float = 0.0       # median tokens/s over the reports after the first 10% of the budget
    signal: str = ""         # one of SIGNALS, or "" when the log is too short to say
    failed: str = ""         # train.py's FAIL reason, if it printed one
    checkpoints: list = None  # the smoothed loss at each of CHECKPOINTS (None where unknown)

    def line(self):
        """One line for a prompt or a report; LEGEND says once what its losses are."""
        if not self.steps:
            return f"no progress lines{f' (FAIL: {self.failed})' if self.failed else ''}"
        points = " ".join("-" if loss is None else _fmt_loss(loss) for loss in self.losses)
        parts = [f"loss {points}", f"{self.steps} steps", f"{_fmt_rate(self.tok_s)} tok/s"]
        if self.signal:
            parts.append(self.signal)
        if self.failed:
            parts.append(f"FAIL: {self.failed}")
        return ", ".join(parts)

    def as_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def parse_progress(text):
    """[(step, progress, loss, tok/s)] from a log's progress lines, and the FAIL reason."""
    points, failed = [], ""
    for line in text.splitlines():
        point = protocol.progress_point(line)
        if point is not None:
            if point[3] is not None:
                points.append(point)
            continue
        m = protocol.FAIL.match(line)
        if m:
            failed = m.group(1)
    return points, failed


def curve_of(text):
    """The Curve of a run's log text."""
    points, failed = parse_progress(text)
    if not points:
        return Curve(losses=[None] * len(FRACTIONS), failed=failed)
    finite = [(p, loss) for _, p, loss, _ in points if math.isfinite(loss)]
    losses = [loss_at(finite, f) for f in FRACTIONS]
    late = [t for _, p, _, t in points if p > 0.10] or [t for *_, t in points]
    return Curve(losses=losses, steps=points[-1][0], tok_s=statistics.median(late),
                 signal=signal_of(finite, failed), failed=failed,
                 checkpoints=[loss_at(finite, p) for p in CHECKPOINTS])


def curve_of_log(path):
    """The Curve of the log at path (None when there is no such file)."""
    try:
        with open(path, errors="replace") as f:
            return curve_of(f.read())
    except OSError:
        return None


def signal_of(points, failed=""):
    """One of SIGNALS for [(progress, smoothed loss)], or "" when there are too few points."""
    if failed in ("nan", "diverged"):
        return "diverging"
    if len(points) < 4:
        return ""
    last, end = points[-1]
    lowest = min(loss for _, loss in points)
    # The last quarter and the second half of what ran: all of the budget, unless it stopped.
    at75 = loss_at(points, 0.75 * last)
    if end > lowest * (1 + DIVERGING) and end > at75:
        return "diverging"
    half = [loss for p, loss in points if p >= 0.5 * last]
    if len(half) >= 3:
        movement = sum(abs(b - a) for a, b in zip(half, half[1:]))
        net = abs(half[0] - half[-1])
        if movement > NOISY * max(net, 1e-9) and movement > 0.01 * end:
            return "noisy"
    return "improving" if at75 - end > IMPROVING * end else "plateaued"


def loss_at(points, fraction):
    """The loss at fraction of the budget from [(progress, smoothed loss)], linearly between
    the reports around it; None past the last report (a run that stopped early)."""
    if not points or fraction > points[-1][0] + 0.02:
        return None
    if fraction <= points[0][0]:
        return points[0][1]
    for (p0, l0), (p1, l1) in zip(points, points[1:]):
        if p0 <= fraction <= p1:
            return l0 if p1 == p0 else l0 + (l1 - l0) * (fraction - p0) / (p1 - p0)
    return points[-1][1]


def _fmt_loss(x):
    return f"{x:.3g}" if x >= 10 else f"{x:.2f}"


def _fmt_rate(x):
    if x >= 1e6:
        return f"{x / 1e6:.1f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def noise_at(groups):
    """{checkpoint: pooled standard deviation of the smoothed loss between runs of one config}
    from groups of runs' {checkpoint: loss}, one group per config run more than once; a
    checkpoint that no config has two losses at is left out."""
    out = {}
    for p in CHECKPOINTS:
        squares, dof = 0.0, 0
        for group in groups:
            losses = [g[p] for g in group if g.get(p) is not None]
            if len(losses) > 1:
                m = sum(losses) / len(losses)
                squares += sum((x - m) ** 2 for x in losses)
                dof += len(losses) - 1
        if dof:
            out[p] = math.sqrt(squares / dof)
    return out
