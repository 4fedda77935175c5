"""The two model-free strategies."""
from autoresearch.proposers.base import Candidate, Proposer, changes_from, describe_changes


class GreedyProposer(Proposer):
    """The incumbent with a few constants nudged; a keep becomes the new base."""
    name = "greedy"

    def propose(self, ctx):
        changes = self.space.mutate(ctx.best, self.rng)
        return Candidate(dict(ctx.best) | changes, changes, describe_changes(changes, ctx.best))


class RandomProposer(Proposer):
    """Independent samples from the whole space."""
    name = "random"

    def propose(self, ctx):
        params = self.space.sample(self.rng)
        changes = changes_from(params, ctx.best)
        return Candidate(params, changes, "random: " + describe_changes(changes, ctx.best))
