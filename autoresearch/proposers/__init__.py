"""Proposers: where the next candidate comes from. The registry lives here. A strategy's module
imports `base` (and llm its greedy fallback from `simple`), never the package or a sibling that
imports it back; centaur is handed its LLM proposer by `make_proposer`."""
import importlib

from autoresearch.proposers.base import Candidate, Context, Proposer, describe_changes  # noqa: F401

# strategy -> (module, class); modules load on first use (llm pulls in the openai client).
REGISTRY = {
    "greedy": ("simple", "GreedyProposer"),
    "random": ("simple", "RandomProposer"),
    "tpe": ("samplers", "TPEProposer"),
    "cmaes": ("samplers", "CmaEsProposer"),
    "llm": ("llm", "LLMProposer"),
    "centaur": ("centaur", "CentaurProposer"),
}
STRATEGIES = tuple(REGISTRY)
LLM_STRATEGIES = ("llm", "centaur")


def make_proposer(name, space, seed=0, llm=None):
    """A proposer by strategy name; llm holds the LLM options (endpoint, model, scope...)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown strategy {name!r} (have: {', '.join(STRATEGIES)})")
    module, cls = REGISTRY[name]
    proposer_class = getattr(importlib.import_module(f"autoresearch.proposers.{module}"), cls)
    if name not in LLM_STRATEGIES:
        return proposer_class(space, seed)
    options = dict(llm or {})
    fraction = options.pop("llm_fraction", None)
    if name == "llm":
        return proposer_class(space, seed, **options)
    if options.get("scope", "params") != "params":
        raise ValueError("centaur proposes constants only; code edits need the llm strategy")
    model = make_proposer("llm", space, seed, options)
    return proposer_class(space, seed, model, **({"llm_fraction": fraction} if fraction is not None else {}))
