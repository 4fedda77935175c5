"""centaur: CMA-ES and an LLM searching together (after "Centaur", arXiv 2603.24647).

CMA-ES proposes most trials. Every k-th trial (k = 1 / llm_fraction) goes to the LLM instead,
whose prompt carries CMA-ES's state in readable form: the mean as a configuration, the step
size, each constant's spread and the strongest correlations. Every result, whoever proposed it,
is told to CMA-ES as part of its current generation, so the LLM's ideas move the distribution
and the distribution informs the LLM.

CMA-ES works in a box [0, 1]^d: each range maps linearly (or by its log), each list of choices
by its index. It runs on the `cmaes` package directly, because it must accept solutions it did
not sample.
"""
import math

import numpy as np

from autoresearch.proposers.base import Candidate, Proposer, changes_from, describe_changes


class Box:
    """A configuration <-> a point in [0, 1]^d."""

    def __init__(self, space):
        self.space = space
        self.names = list(space.params)
        self.choices = {n: sorted(p.choices) if all(isinstance(c, (int, float)) and not isinstance(c, bool)
                                                  for c in p.choices) else list(p.choices)
                        for n, p in space.params.items() if p.choices is not None}

    def encode(self, params):
        x = []
        for n in self.names:
            p, v = self.space.params[n], params[n]
            if n in self.choices:
                opts = self.choices[n]
                x.append(opts.index(v) / (len(opts) - 1) if v in opts and len(opts) > 1 else 0.5)
            elif p.log:
                x.append((math.log(v) - math.log(p.low)) / (math.log(p.high) - math.log(p.low)))
            else:
                x.append((v - p.low) / (p.high - p.low))
        return np.clip(np.array(x, dtype=float), 0.0, 1.0)

    def decode(self, x):
        out = {}
        for n, xi in zip(self.names, np.clip(x, 0.0, 1.0)):
            p = self.space.params[n]
            if n in self.choices:
                opts = self.choices[n]
                out[n] = opts[int(round(xi * (len(opts) - 1)))]
            elif p.log:
                out[n] = p._snap(math.exp(math.log(p.low) + xi * (math.log(p.high) - math.log(p.low))))
            else:
                out[n] = p._snap(p.low + xi * (p.high - p.low))
        return out


class CentaurProposer(Proposer):
    name = "centaur"
    reads_curves = True

    def __init__(self, space, seed=0, llm=None, llm_fraction=0.3, sigma=0.2):
        """llm: the LLM proposer it asks every k-th time (proposers.make_proposer builds it
        from the LLM options, so this module imports only base)."""
        super().__init__(space, seed)
        if llm is None:
            raise ValueError("centaur needs an LLM proposer")
        if not 0 < llm_fraction <= 1:
            raise ValueError("llm_fraction must be in (0, 1]")
        self.every = max(1, round(1 / llm_fraction))
        self.llm = llm
        self.box, self.sigma, self.seed = Box(space), sigma, seed
        self.cma, self.generation, self.proposals = None, [], 0
        self.worst = None   # crashes are told as a bit worse than the worst result seen
        self.llm_points = 0

    def _ensure_cma(self, best):
        if self.cma is None:
            from cmaes import CMA
            d = len(self.box.names)
            self.cma = CMA(mean=self.box.encode(best), sigma=self.sigma, seed=self.seed,
                           bounds=np.array([[0.0, 1.0]] * d), population_size=max(4, 4 + int(3 * math.log(d))))

    def state_text(self):
        """CMA-ES's state, in the constants' own terms, for the LLM."""
        mean = self.box.decode(self.cma.mean)
        C = self.cma._C
        sigma = self.cma._sigma
        spread = {n: sigma * math.sqrt(C[i, i]) for i, n in enumerate(self.box.names)}
        corr = []
        for i in range(len(self.box.names)):
            for j in range(i + 1, len(self.box.names)):
                r = C[i, j] / math.sqrt(C[i, i] * C[j, j])
                corr.append((abs(r), r, self.box.names[i], self.box.names[j]))
        corr.sort(reverse=True)
        lines = ["CMA-ES state (a distribution over configurations; each constant scaled to [0, 1]",
                 "over its range, by log where the range is log-scaled):",
                 f"  mean configuration: {_jsonable(mean)}",
                 f"  step size sigma: {sigma:.3f}; generation {self.cma.generation}",
                 "  spread per constant: " + ", ".join(f"{n} {s:.2f}" for n, s in spread.items())]
        if corr:
            lines.append("  strongest correlations: " + ", ".join(
                f"{a}~{b} {r:+.2f}" for _, r, a, b in corr[:3]))
        lines.append("You may propose a point the distribution has not tried yet, or move against "
                     "it where the history says it is wrong.")
        return "\n".join(lines)

    def warm_start(self, ctx):
        self.llm.warm_start(ctx)
        self._ensure_cma(ctx.best)  # centred on the incumbent; decided configs join it as told

    def propose(self, ctx):
        self._ensure_cma(ctx.best)
        self.proposals += 1
        if self.proposals % self.every == 0:
            self.llm.context_note = self.state_text()
            cand = self.llm.propose(ctx)
            cand.description = "centaur/" + cand.description
            cand.meta["by"] = "llm"
            return cand
        x = self.cma.ask()
        params = self.box.decode(x)
        changes = changes_from(params, ctx.best)
        return Candidate(params, changes, "centaur/cmaes: " + describe_changes(changes, ctx.best),
                         meta={"by": "cmaes"})

    def _told(self, params, value):
        if value is not None:
            self.worst = value if self.worst is None else max(self.worst, value)
        elif self.worst is None:
            return  # nothing to compare a crash with yet
        else:
            value = self.worst + 0.1 * abs(self.worst)
        self.generation.append((self.box.encode(params), value))
        if len(self.generation) == self.cma.population_size:
            self.cma.tell(self.generation)
            self.generation = []

    def tell(self, candidate, config):
        """Every decided config goes into CMA-ES's generation with its mean, whoever proposed
        it (crashes and stopped runs as a bit worse than the worst result)."""
        self.llm.tell(candidate, config)
        if candidate is not None and candidate.meta.get("by") == "llm" \
                and not candidate.meta.get("fallback"):
            self.llm_points += 1
        self._told(config.params, None if config.status in ("crash", "pruned") else config.mean)

    def reject(self, candidate, known=None):
        if candidate.meta.get("by") == "cmaes":  # CMA-ES must hear about every point it sampled
            self._told(candidate.params, known.mean if known is not None else None)


def _jsonable(params):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
