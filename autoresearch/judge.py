"""Keep or discard: the rule that decides whether a trial becomes the new best."""


class Judge:
    """Decides from a trial's val_bpb and the current best. A noise-aware judge can also look at
    the history (repeated baselines, seeds) through `history`."""

    def keep(self, val_bpb, best_val_bpb, history=()):
        raise NotImplementedError

    def describe(self):
        return type(self).__name__


class ThresholdJudge(Judge):
    """Keep when val_bpb beats the best by more than min_delta (default: any improvement)."""

    def __init__(self, min_delta=0.0):
        if min_delta < 0:
            raise ValueError("min_delta must be >= 0")
        self.min_delta = min_delta

    def keep(self, val_bpb, best_val_bpb, history=()):
        return best_val_bpb is None or val_bpb < best_val_bpb - self.min_delta

    def describe(self):
        return f"keep if val_bpb < best - {self.min_delta:g}"
