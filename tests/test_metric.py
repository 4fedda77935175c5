"""evaluate_bpb against values computed another way, and the synthetic floor."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prepare
from test_dataloader import oracle_rows


class TableModel(torch.nn.Module):
    """A bigram model: logits = table[previous token]. The simplest model with real logits."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.as_tensor(table, dtype=torch.float32))

    def forward(self, x, y, reduction="mean"):
        logits = self.table[x]
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1),
                               reduction=reduction).view(y.shape)


def eval_rows_by_oracle(data):
    split = data.split("val")
    docs = [split.doc(i) for i in range(len(split))]
    rows, _ = oracle_rows(docs, data.profile.max_seq_len + 1, 1000, prepare.eval_rows(data.profile))
    rows = np.array(rows)
    return rows[:, :-1], rows[:, 1:]


def test_uniform_model_lands_where_theory_says(smoke_data):
    V = smoke_data.vocab_size
    model = TableModel(np.zeros((V, V)))
    _, y = eval_rows_by_oracle(smoke_data)
    nbytes = smoke_data.token_bytes[y]
    expected = (nbytes > 0).sum() * math.log2(V) / nbytes.sum()
    assert smoke_data.evaluate_bpb(model, 16) == pytest.approx(expected, rel=1e-6)
    assert expected > smoke_data.floor_bpb


def test_bigram_model_matches_a_hand_computation(smoke_data):
    V = smoke_data.vocab_size
    table = np.random.default_rng(0).normal(size=(V, V)) * 2
    x, y = eval_rows_by_oracle(smoke_data)
    logp = table - np.log(np.exp(table).sum(axis=1, keepdims=True))  # log-softmax per row
    nats = -logp[x, y]
    nbytes = smoke_data.token_bytes[y]
    expected = nats[nbytes > 0].sum() / math.log(2) / nbytes.sum()
    got = smoke_data.evaluate_bpb(TableModel(table), 16)
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 7, 200])
def test_metric_does_not_depend_on_batch_size(smoke_data, batch_size):
    table = np.random.default_rng(1).normal(size=(smoke_data.vocab_size,) * 2)
    model = TableModel(table)
    assert smoke_data.evaluate_bpb(model, batch_size) == pytest.approx(
        smoke_data.evaluate_bpb(model, 16), rel=1e-5)


def test_special_token_targets_are_left_out(smoke_data):
    """Whatever a model says about BOS targets (even nan), the metric does not see it."""
    bos = smoke_data.bos_token_id

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, y, reduction="none"):
            loss = torch.ones(y.shape)
            return torch.where(y == bos, torch.full_like(loss, float("nan")), loss)

    _, y = eval_rows_by_oracle(smoke_data)
    nbytes = smoke_data.token_bytes[y]
    assert (y == bos).any()
    expected = (nbytes > 0).sum() / math.log(2) / nbytes.sum()
    assert smoke_data.evaluate_bpb(Model(), 16) == pytest.approx(expected, rel=1e-6)


def bigram_counts(rows, V):
    counts = np.zeros((V, V))
    for row in rows:
        np.add.at(counts, (row[:-1], row[1:]), 1)
    return counts


def test_no_honest_model_beats_the_floor_a_leaking_one_does(smoke_data):
    V = smoke_data.vocab_size
    floor = smoke_data.floor_bpb
    assert 0 < floor < 8
    # Honest: a smoothed bigram fitted on the train split only.
    train = smoke_data.split("train")
    counts = bigram_counts([train.tokens[:2_000_000].astype(np.int64)], V)
    honest = smoke_data.evaluate_bpb(TableModel(np.log(counts + 0.01)), 16)
    assert honest > floor
    # Leaking: a model that has seen the validation rows (here: memorised them outright) goes
    # below the floor, which is how a leak between the splits or a mis-counted metric shows.
    x, y = eval_rows_by_oracle(smoke_data)
    memory = {tuple(xr): torch.as_tensor(yr, dtype=torch.int64) for xr, yr in zip(x.tolist(), y)}

    class Memoriser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, xb, yb, reduction="none"):
            logits = torch.zeros(*xb.shape, V)
            for i, row in enumerate(xb.tolist()):
                logits[i].scatter_(1, memory[tuple(row)][:, None], 5.0)
            return F.cross_entropy(logits.view(-1, V), yb.reshape(-1), reduction="none").view(yb.shape)

    leaky = smoke_data.evaluate_bpb(Memoriser(), 16)
    assert leaky < floor, (leaky, honest, floor)


def test_floor_is_the_exact_log_loss_of_the_evaluated_bytes(smoke_data):
    """Recompute the floor from the oracle's rows and the process definition."""
    process = prepare.synthetic_source(4000).process
    x, y = eval_rows_by_oracle(smoke_data)
    rows = np.concatenate([x, y[:, -1:]], axis=1)
    bos = smoke_data.bos_token_id
    bits = nbytes = 0
    for row in rows:
        starts = list(np.flatnonzero(row == bos)) + [len(row)]
        for a, b in zip(starts[:-1], starts[1:]):
            text = smoke_data.tokenizer.decode(row[a + 1:b].tolist())
            bits += process.prefix_bits(text)
            nbytes += len(text)
    assert bits / nbytes == pytest.approx(smoke_data.floor_bpb, rel=1e-9)
