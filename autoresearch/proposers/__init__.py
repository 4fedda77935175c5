"""Proposers: where the next candidate comes from. The registry lives here; each strategy's
module imports only `base`, so nothing imports the module that imports it."""
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
    if name == "llm":
        options.pop("llm_fraction", None)
    elif options.pop("scope", "params") != "params":
        raise ValueError("centaur proposes constants only; code edits need the llm strategy")
    return proposer_class(space, seed, **options)
