"""Dataloader throughput over the `python` corpus, ours against a naive reference, side by side.

    python bench/dataloader.py [--seconds 5]

The reference is the loader as first written in Karpathy's autoresearch, moved to CPU: it
tokenizes documents on the fly and scans a 1000-document Python list for each best fit. Ours
reads the token cache prepare.py wrote and finds each best fit by bisection. Both yield
(inputs, targets) int64 tensors on the CPU; throughput counts B*T tokens per batch.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prepare  # noqa: E402


def naive_loader(data, B, T, buffer_size=1000):
    enc, bos = data.tokenizer, data.bos_token_id
    source = prepare.python_source()

    def doc_batches():
        while True:
            batch = []
            for doc in source.documents("train"):
                batch.append(doc)
                if len(batch) == 128:
                    yield batch
                    batch = []

    batches = doc_batches()
    buffer = []
    row_len = T + 1
    while True:
        rows = torch.empty((B, row_len), dtype=torch.long)
        for r in range(B):
            pos = 0
            while pos < row_len:
                while len(buffer) < buffer_size:
                    buffer.extend([bos] + ids for ids in enc.encode_ordinary_batch(next(batches)))
                remaining = row_len - pos
                best, best_len = -1, 0
                for i, doc in enumerate(buffer):
                    if best_len < len(doc) <= remaining:
                        best, best_len = i, len(doc)
                if best >= 0:
                    doc = buffer.pop(best)
                else:
                    doc = buffer.pop(min(range(len(buffer)), key=lambda i: len(buffer[i])))[:remaining]
                rows[r, pos:pos + len(doc)] = torch.tensor(doc)
                pos += len(doc)
        yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def throughput(loader, B, T, seconds):
    next(loader)  # fill buffers outside the clock
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(loader)
        n += 1
    return n * B * T / (time.perf_counter() - t0) / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--cache-dir", help="default: $AUTORESEARCH_CACHE or ~/.cache/autoresearch")
    args = ap.parse_args()
    root = prepare.cache_dir(args.cache_dir)
    path = prepare.prepare(prepare.PROFILES["cpu"], prepare.python_source(), root,
                           log=lambda *a: None)
    data = prepare.load_prepared(path)
    print(f"corpus: {path}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print(f"{'B':>4} {'T':>5} {'naive Mtok/s':>13} {'ours Mtok/s':>12} {'ratio':>7}")
    for B, T in ((128, 2048), (32, 512)):
        naive = throughput(naive_loader(data, B, T), B, T, args.seconds)
        ours = throughput(data.make_dataloader("train", B, "cpu", seq_len=T), B, T, args.seconds)
        print(f"{B:>4} {T:>5} {naive:>13.2f} {ours:>12.1f} {ours / naive:>6.0f}x")


if __name__ == "__main__":
    main()
