"""One study shared by many workers, on one machine or many, kept in Optuna's storage.

A journal file beside results.tsv by default, an SQLite file, or PostgreSQL across machines.
Optuna gives what a shared record needs: trial numbers unique within a study (the study row is
locked while a number is counted), trials whose worker stopped beating failed by whoever looks
next, and a schema that optuna-dashboard reads. This package adds what the loop needs on top:

- a trial carries a *job* (what the worker is about to run: config, params, seed, worker ...)
  as its user attribute `job`, written in the same transaction that creates the trial;
- the finished results row is one user attribute `row`, so it is never half written;
- a trial whose worker died (kill -9, lost machine) reads back as a crash row, error `lost`;
- a database that goes away is retried with backoff for `retry_seconds`, then StorageError.

    shared = SharedStudy("sqlite:///results.db", "autoresearch")
    number = shared.reserve({"config": "3f2a1c", "seed": 43, "worker": "gpubox/cuda:1", ...})
    ...run the trial...
    shared.finish(number, row, value=row["val_bpb"])   # value None: a crash
    sync_results_tsv(shared, "results.tsv")

One job per module: location.py (where a study lives and its Optuna storage), study.py (the
SharedStudy itself), liveness.py (trial owners, heartbeats, failing dead trials), view.py
(results.tsv as the study's view) and importing.py (seeding a study with an old results.tsv).
"""
from autoresearch.ledger import COLUMNS, StorageError
from autoresearch.storage.importing import import_rows
from autoresearch.storage.location import (MEMORY, is_journal, normalize_url, open_storage,
                                           study_location)
from autoresearch.storage.study import SharedStudy
from autoresearch.storage.view import sync_results_tsv

__all__ = ["COLUMNS", "MEMORY", "SharedStudy", "StorageError", "import_rows", "is_journal",
           "normalize_url", "open_storage", "study_location", "sync_results_tsv"]
