"""Keep or discard: the rule that decides whether a trial becomes the new best."""
import json
import math

from autoresearch.edits import is_code_edit


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


def noise_floor(rows):
    """How much val_bpb varies when one configuration runs again, from the results themselves:
    the pooled standard deviation over groups of finished trials with the same searched values
    (SEED aside, so a space that searches SEED measures it). None until some configuration has
    run twice. Code edits are left out: the same values there ran other code."""
    groups = {}
    for r in rows:
        if r.get("status") not in ("keep", "discard") or not r.get("params") or is_code_edit(r):
            continue
        params = {k: v for k, v in json.loads(r["params"]).items() if k != "SEED"}
        groups.setdefault(json.dumps(params, sort_keys=True), []).append(float(r["val_bpb"]))
    repeats = [g for g in groups.values() if len(g) > 1]
    if not repeats:
        return None
    squares = sum(sum((v - sum(g) / len(g)) ** 2 for v in g) for g in repeats)
    dof = sum(len(g) - 1 for g in repeats)
    return {"std": math.sqrt(squares / dof), "runs": sum(len(g) for g in repeats),
            "configs": len(repeats)}
