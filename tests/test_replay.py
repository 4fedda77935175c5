"""The replay benchmark's harness against a tiny table: the real driver gets recorded runs, time
is the recorded seconds, the stopping rule sees the recorded curves."""
import json
import math
import os
import sys

import pytest

from autoresearch.patch import patch_constants
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import replay  # noqa: E402

LEVELS = {"MATRIX_LR": [0.02, 0.04, 0.08], "DEPTH": [1, 2]}
SEED_LUCK = {s: 0.004 * math.sin(3 * s) for s in range(1, 11)}


def true_value(config):
    return 1.5 + 0.2 * (math.log(config["MATRIX_LR"] / 0.08)) ** 2 + 0.03 * (config["DEPTH"] - 1)


@pytest.fixture
def table_path(tmp_path):
    rows = []
    for lr in LEVELS["MATRIX_LR"]:
        for depth in LEVELS["DEPTH"]:
            config = {"MATRIX_LR": lr, "DEPTH": depth}
            seeds = range(1, 11) if (lr, depth) == (0.04, 2) else range(1, 4)
            for seed in seeds:
                value = true_value(config) + SEED_LUCK[seed]
                curve = [[i / 20, round(value + 2 * (1 - i / 20), 4)] for i in range(1, 21)]
                rows.append({"config": config, "seed": seed, "val_bpb": value, "error": "",
                             "num_steps": 40, "training_seconds": 20.0, "total_seconds": 24.0,
                             "startup_seconds": 2.0, "eval_seconds": 2.0, "wall_seconds": 25.0,
                             "budget": 20, "curve": curve, "load": 0.1, "recorded_at": ""})
    path = tmp_path / "table.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_table_reads_configs_seeds_and_means(table_path):
    t = replay.Table(table_path)
    assert len(t.runs) == 6 and t.common_seeds == [1, 2, 3]
    base = replay.key_of({"DEPTH": 2, "MATRIX_LR": 0.04})
    assert len(t.runs[base]) == 10
    assert t.mean[base] == pytest.approx(true_value({"MATRIX_LR": 0.04, "DEPTH": 2})
                                         + sum(SEED_LUCK.values()) / 10)
    assert "MATRIX_LR: {choices: [0.02, 0.04, 0.08]}" in t.space_yaml("smoke")


def test_the_trainer_returns_the_recorded_run_of_the_seed_asked_for(table_path, tmp_path,
                                                                      smoke_data):
    import random
    t = replay.Table(table_path)
    trainer = replay.ReplayTrainer(t, {"MATRIX_LR": 0.04, "DEPTH": 2}, random.Random(1))
    source = "MATRIX_LR = None\nDEPTH = 1\nSEED = 2\n"
    out = trainer(str(tmp_path / "t"), source, 60, smoke_data.dir, {}, None)
    recorded = trainer.order[1]
    assert out.ok and out.summary["val_bpb"] == pytest.approx(
        true_value({"MATRIX_LR": 0.04, "DEPTH": 1}) + SEED_LUCK[recorded])
    assert trainer.spent == 25.0 and trainer.synthetic == 0
    # past the recorded SEEDs: drawn around the config's mean, and counted
    trainer(str(tmp_path / "u"), patch_constants(source, {"SEED": 5}), 60, smoke_data.dir, {}, None)
    assert trainer.synthetic == 1
    # a stop asked for by the callback ends the run there, charging what it used
    stop = trainer(str(tmp_path / "v"), source, 60, smoke_data.dir, {},
                   lambda line: "pruned at 30%" if "progress 0.300" in line else None)
    assert stop.pruned and stop.error == "pruned at 30%"
    assert stop.wall_seconds == pytest.approx(25.0 - 20.0 * 0.7 - 2.0)
    assert trainer.saved == pytest.approx(25.0 - stop.wall_seconds)


def test_replayed_loops_run_the_real_driver_and_measure_the_judges(table_path, smoke_data):
    t = replay.Table(table_path)
    noise = replay.replay_loop(t, "noise", "greedy", 0, 12, smoke_data.dir)
    again = replay.replay_loop(t, "noise", "greedy", 0, 12, smoke_data.dir)
    assert noise == again  # a loop is reproducible
    assert noise["runs"] >= 12 and noise["outside"] == 0
    assert noise["true_gain"] >= 0
    assert noise["false_keeps"] <= noise["keeps"]
    pruned = replay.replay_loop(t, "prune", "greedy", 0, 12, smoke_data.dir)
    assert pruned["pruned"] >= 1 and pruned["saved"] > 0
    assert pruned["false_prunes"] == 0  # these curves foretell the end exactly
    row = replay.summarize([noise, pruned])
    assert row["loops"] == 2 and 0 <= row["false_keep_rate"] <= 1
    assert 0 < row["saved_share"] < 1
