"""evaluate_bpb against values computed another way, the checks that ride on it (causality,
statelessness), the socket it is served over, and the synthetic floor."""
import math
import socket
import threading
from multiprocessing.connection import Connection

import numpy as np
import pytest
import torch

import prepare
from test_dataloader import oracle_rows


class TableModel(torch.nn.Module):
    """A bigram model: logits = table[previous token]. The simplest model with real logits."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.as_tensor(table, dtype=torch.float32))

    def forward(self, x):
        return self.table[x]


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
    """Whatever losses come back for BOS targets (even nan), the metric does not see them."""
    bos = smoke_data.bos_token_id

    def score(x, y):
        return np.where(y == bos, np.nan, 1.0).astype(np.float32)

    _, y = eval_rows_by_oracle(smoke_data)
    nbytes = smoke_data.token_bytes[y]
    assert (y == bos).any()
    expected = (nbytes > 0).sum() / math.log(2) / nbytes.sum()
    assert smoke_data.fixed_eval().run(score, 16) == pytest.approx(expected, rel=1e-6)


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
    # Leaking: a model that has seen the validation rows (here: memorised every prefix, which
    # is causal, so no check stops it) goes below the floor, which is how a leak between the
    # splits or a mis-counted metric shows. Keeping the rows out of the trainer's reach is the
    # sandbox's job.
    x, y = eval_rows_by_oracle(smoke_data)
    memory = {tuple(xr[:t + 1]): yr[t] for xr, yr in zip(x.tolist(), y.tolist())
              for t in range(len(xr))}

    class Memoriser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, xb):
            logits = torch.zeros(*xb.shape, V)
            for i, row in enumerate(xb.tolist()):
                for t in range(len(row)):
                    nxt = memory.get(tuple(row[:t + 1]))
                    if nxt is not None:
                        logits[i, t, nxt] = 5.0
            return logits

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


# --- the checks ------------------------------------------------------------------------------

class PeekingModel(TableModel):
    """A bigram table read at the *next* input token: the non-causal bug, in its purest form."""

    def forward(self, x):
        return self.table[torch.roll(x, -1, dims=1)]


class LearningModel(TableModel):
    """Counts the bigrams of every batch it is shown, so rows seen again score better."""

    def forward(self, x):
        logits = torch.log_softmax(self.table, -1)[x]
        with torch.no_grad():
            self.table.index_put_((x[:, :-1].reshape(-1), x[:, 1:].reshape(-1)),
                                  torch.tensor(1.0), accumulate=True)
        return logits


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_a_model_that_peeks_ahead_is_never_scored(smoke_data, batch_size):
    table = np.random.default_rng(2).normal(size=(smoke_data.vocab_size,) * 2)
    with pytest.raises(prepare.ContractError, match="non-causal: the loss at positions up to"):
        smoke_data.evaluate_bpb(PeekingModel(table), batch_size)


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_a_model_that_learns_while_evaluated_is_never_scored(smoke_data, batch_size):
    with pytest.raises(prepare.ContractError, match="stateful"):
        smoke_data.evaluate_bpb(LearningModel(np.zeros((smoke_data.vocab_size,) * 2)), batch_size)


def test_the_checks_cost_one_batch(smoke_data):
    calls = []

    def score(x, y):
        calls.append(x.shape)
        return np.ones(x.shape, dtype=np.float32)

    smoke_data.fixed_eval().run(score, 16)
    rows = prepare.eval_rows(smoke_data.profile)
    assert calls == [(16, smoke_data.profile.max_seq_len)] * (rows // 16 + 1)


@pytest.mark.parametrize("answer,message", [
    (lambda x: np.ones((len(x), 3), np.float32), "shape"),
    (lambda x: -np.ones(x.shape, np.float32), "negative loss"),
    (lambda x: np.ones(x.shape, np.int32), "float losses"),
])
def test_malformed_losses_are_refused(smoke_data, answer, message):
    with pytest.raises(prepare.ContractError, match=message):
        smoke_data.fixed_eval().run(lambda x, y: answer(x), 16)


# --- served over a socket, as under the loop --------------------------------------------------

def serve_in_thread(fixed):
    ours, theirs = socket.socketpair()
    result = {}
    conn = Connection(ours.detach())
    thread = threading.Thread(target=lambda: result.update(out=fixed.serve(conn)))
    thread.start()
    return theirs, thread, result


def test_served_evaluation_equals_the_local_one(smoke_data):
    model = TableModel(np.random.default_rng(3).normal(size=(smoke_data.vocab_size,) * 2))
    local = smoke_data.evaluate_bpb(model, 16)
    theirs, thread, result = serve_in_thread(smoke_data.fixed_eval())
    remote = prepare.evaluate_remotely(theirs.detach(), prepare.model_scorer(model), 7)
    thread.join(10)
    assert remote == local == result["out"]["val_bpb"]  # bit for bit, whatever the batch size
    prepare._remote_done = False


def test_served_checks_reach_the_trainer_as_contract_errors(smoke_data):
    table = np.random.default_rng(2).normal(size=(smoke_data.vocab_size,) * 2)
    theirs, thread, result = serve_in_thread(smoke_data.fixed_eval())
    with pytest.raises(prepare.ContractError, match="non-causal"):
        prepare.evaluate_remotely(theirs.detach(), prepare.model_scorer(PeekingModel(table)), 16)
    thread.join(10)
    assert result["out"]["error"].startswith("non-causal")
    with pytest.raises(prepare.ContractError, match="once per trial"):
        prepare.evaluate_remotely(0, None, 16)
    prepare._remote_done = False


def raw_client(sock, script):
    """Speak to FixedEval.serve by hand: script(conn) sends what a misbehaving trainer would."""
    conn = Connection(sock.detach())
    try:
        script(conn)
    except OSError:  # the loop hung up on it first
        pass
    finally:
        conn.close()


@pytest.mark.parametrize("script,error", [
    (lambda c: c.send_bytes(b"\x80\x04pickle"), "protocol: a message that is not JSON"),
    (lambda c: c.send_bytes(b'{"batch_size": true}'), "protocol: the first message"),
    (lambda c: c.send_bytes(b"x" * 5000), None),  # longer than a hello may be: hung up on
    (lambda c: (c.send_bytes(b'{"batch_size": 16}'), c.recv_bytes(), c.recv_bytes(),
                c.recv_bytes(), c.send_bytes(b"\0" * 12)), "protocol: 12 bytes of losses"),
    (lambda c: (c.send_bytes(b'{"batch_size": 16}'), c.recv_bytes(), c.recv_bytes(),
                c.recv_bytes(), c.send_bytes(b"\0" * 10**6)), "protocol: an answer longer"),
    (lambda c: c.send_bytes(b'{"batch_size": 16}'), None),  # hangs up mid-evaluation
])
def test_a_misbehaving_trainer_gets_an_error_or_nothing(smoke_data, script, error):
    theirs, thread, result = serve_in_thread(smoke_data.fixed_eval())
    raw_client(theirs, script)
    thread.join(10)
    assert not thread.is_alive()
    if error is None:
        assert result["out"] is None or "error" in result["out"]
    else:
        assert result["out"]["error"].startswith(error), result
