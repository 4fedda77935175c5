"""The fast best-fit loader against the straightforward one, row for row."""
import numpy as np
import pytest
import torch

import prepare


def oracle_rows(docs, row_len, buffer_size, num_rows):
    """Karpathy's algorithm as plainly as it can be written: a list as the buffer, kept full from
    a cycling document stream, scanned for the largest document that fits, else the shortest
    cropped. Returns the rows and the epoch after each row."""
    buffer_size = min(buffer_size, len(docs))
    buffer, fetched, epoch, rows, epochs = [], 0, 1, [], []
    for _ in range(num_rows):
        row = []
        while len(row) < row_len:
            while len(buffer) < buffer_size:
                epoch = fetched // len(docs) + 1
                buffer.append(list(docs[fetched % len(docs)]))
                fetched += 1
            remaining = row_len - len(row)
            best = -1
            for i, doc in enumerate(buffer):
                if len(doc) <= remaining and (best < 0 or len(doc) > len(buffer[best])):
                    best = i
            if best >= 0:
                row += buffer.pop(best)
            else:
                shortest = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                row += buffer.pop(shortest)[:remaining]
        rows.append(row)
        epochs.append(epoch)
    return rows, epochs


class FakeSplit:
    """A TokenSplit built in memory: BOS (id 0) then random tokens, random lengths."""

    def __init__(self, lengths, seed=0):
        rng = np.random.default_rng(seed)
        docs = []
        for n in lengths:
            doc = rng.integers(1, 1000, size=n).astype(np.uint16)
            doc[0] = 0
            docs.append(doc)
        self.docs = docs
        self.tokens = np.concatenate(docs)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)


@pytest.mark.parametrize("seq_len,batch,buffer,num_docs,max_len", [
    (16, 4, 8, 50, 40),       # many docs longer than a row: lots of cropping
    (64, 8, 1000, 30, 30),    # buffer larger than the split: cycles, duplicates in the buffer
    (128, 3, 20, 500, 300),   # mixed
    (32, 5, 5, 7, 3),         # tiny docs, tiny buffer, many epochs
    (2048, 2, 1000, 3000, 5000),
])
def test_fast_loader_matches_oracle(seq_len, batch, buffer, num_docs, max_len):
    rng = np.random.default_rng(seq_len + num_docs)
    lengths = rng.integers(2, max_len + 1, size=num_docs)
    split = FakeSplit(lengths, seed=1)
    num_batches = 12
    want, want_epochs = oracle_rows(split.docs, seq_len + 1, buffer, batch * num_batches)
    loader = prepare.make_dataloader(split, batch, seq_len, "cpu", buffer)
    for b in range(num_batches):
        x, y, epoch = next(loader)
        assert x.shape == y.shape == (batch, seq_len)
        assert x.dtype == y.dtype == torch.int64 and x.is_contiguous() and y.is_contiguous()
        rows = np.array(want[b * batch:(b + 1) * batch])
        np.testing.assert_array_equal(x.numpy(), rows[:, :-1])
        np.testing.assert_array_equal(y.numpy(), rows[:, 1:])
        assert epoch == want_epochs[(b + 1) * batch - 1]
        assert (x[:, 0] == 0).all()  # every row starts at a BOS


def test_rows_from_real_cache_are_documents(smoke_data):
    """On a prepared split: each row is whole documents plus a cropped one, no padding."""
    split = smoke_data.split("train")
    T = smoke_data.profile.max_seq_len
    packer = prepare.BestFitPacker(split.lengths, T + 1)
    x, y, _ = next(smoke_data.make_dataloader("train", 4, "cpu"))
    bos = smoke_data.bos_token_id
    for r in range(4):
        segments = packer.next_row()
        assert sum(take for _, take in segments) == T + 1
        assert all(take == split.lengths[d] for d, take in segments[:-1])
        row = np.concatenate([split.doc(d)[:take] for d, take in segments])
        np.testing.assert_array_equal(x[r].numpy(), row[:-1])
        np.testing.assert_array_equal(y[r].numpy(), row[1:])
        assert (row == bos).sum() == len(segments)


def test_epoch_counts_passes_over_the_split():
    split = FakeSplit([10] * 20)
    loader = prepare.make_dataloader(split, 1, 9, "cpu", buffer_size=4)  # one doc per row
    epochs = [next(loader)[2] for _ in range(60)]
    # Row k has fetched k + 3 documents (a buffer of 4, one refill per row): the epoch is that
    # of the last one fetched.
    assert epochs == [(k + 2) // 20 + 1 for k in range(1, 61)]
    assert epochs[:17] == [1] * 17 and epochs[17] == 2


def test_empty_split_is_an_error():
    with pytest.raises(prepare.PrepareError):
        prepare.BestFitPacker(np.array([], dtype=np.int64), 16)
