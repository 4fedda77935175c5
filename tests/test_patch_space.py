"""Patching train.py through the syntax tree, and search_space.yaml validation."""
import ast
import os
import random

import pytest
import yaml

from autoresearch.patch import PatchError, patch_constants, read_constants
from autoresearch.space import SpaceError, load_space, parse_space
from conftest import ROOT

SOURCE = '''"""A docstring mentioning LR = 5 that must not change."""
import math

LR = 0.04            # the learning rate; comment kept
BETAS = (0.8, 0.95)  # tuple
NAME = "SSSL"
BIG = 2**19
NEG = -3
OFF = None
é_SAFE = 1  # non-ASCII before a value on another line: ünïcode = 1
LABEL = "ünïcode"; DEPTH = 8
DERIVED = LR * 2


def f():
    LR = 123  # not top level
    return LR
'''


def test_read_constants():
    c = read_constants(SOURCE, ["LR", "BETAS", "NAME", "BIG", "NEG", "OFF", "DEPTH"])
    assert c == {"LR": 0.04, "BETAS": (0.8, 0.95), "NAME": "SSSL", "BIG": 524288, "NEG": -3,
                 "OFF": None, "DEPTH": 8}
    everything = read_constants(SOURCE)
    assert "DERIVED" not in everything and everything["LABEL"] == "ünïcode"


def test_patch_changes_only_the_named_values():
    out = patch_constants(SOURCE, {"LR": 0.05, "BETAS": (0.9, 0.99), "NAME": "L", "OFF": 7,
                                   "DEPTH": 12, "LABEL": "x\ty"})
    assert read_constants(out, ["LR", "BETAS", "NAME", "OFF", "DEPTH", "LABEL", "BIG"]) == {
        "LR": 0.05, "BETAS": (0.9, 0.99), "NAME": "L", "OFF": 7, "DEPTH": 12, "LABEL": "x\ty",
        "BIG": 524288}
    assert "LR = 0.05            # the learning rate; comment kept\n" in out
    assert 'LABEL = \'x\\ty\'; DEPTH = 12\n' in out
    assert "LR = 123  # not top level" in out and "mentioning LR = 5" in out
    # Nothing else moved: the diff is exactly the edited lines.
    changed = [a for a, b in zip(SOURCE.splitlines(), out.splitlines()) if a != b]
    assert len(changed) == 5 and len(SOURCE.splitlines()) == len(out.splitlines())


def test_patch_the_real_train_py():
    src = open(os.path.join(ROOT, "train.py")).read()
    out = patch_constants(src, {"MATRIX_LR": 0.05, "ADAM_BETAS": (0.9, 0.95), "DEPTH": 3})
    assert read_constants(out, ["MATRIX_LR", "ADAM_BETAS", "DEPTH", "SEED"]) == {
        "MATRIX_LR": 0.05, "ADAM_BETAS": (0.9, 0.95), "DEPTH": 3, "SEED": 42}
    compile(out, "train.py", "exec")


@pytest.mark.parametrize("changes,message", [
    ({"MISSING": 1}, "no top-level constant MISSING"),
    ({"DERIVED": 1}, "DERIVED is not a literal"),
    ({"LR": object()}, "cannot write a object"),
    ({"LR": float("nan")}, "cannot write nan"),
])
def test_patch_errors(changes, message):
    with pytest.raises(PatchError, match=message):
        patch_constants(SOURCE, changes)


def test_a_value_cannot_inject_code():
    evil = "x'); import os; os.system('echo pwned'); ('"
    out = patch_constants(SOURCE, {"LR": evil})
    assert read_constants(out, ["LR"])["LR"] == evil
    assert len(ast.parse(out).body) == len(ast.parse(SOURCE).body)  # still one statement


def test_duplicated_constant_is_refused():
    with pytest.raises(PatchError, match="assigns LR 2 times"):
        patch_constants(SOURCE + "LR = 0.1\n", {"LR": 0.2})


# --- search spaces ---------------------------------------------------------------------------

CONSTANTS = {"LR": 0.04, "DEPTH": 8, "NAME": "SSSL", "BETAS": (0.8, 0.95), "BATCH": 64,
             "TOTAL": 2048, "MAX_SEQ_LEN": 16}


def space(params, constraints=(), mutate=(2, 3)):
    return parse_space({"params": params, "constraints": list(constraints),
                        "mutate": list(mutate)}, "p", CONSTANTS)


def test_shipped_space_is_valid_for_every_profile(smoke_data):
    import prepare
    src = open(os.path.join(ROOT, "train.py")).read()
    for name, profile in prepare.PROFILES.items():
        consts = {k: (profile.train.get(k) if v is None else v) for k, v in read_constants(src).items()}
        consts |= {"MAX_SEQ_LEN": profile.max_seq_len, "TIME_BUDGET": profile.time_budget,
                   "EVAL_TOKENS": profile.eval_tokens, "VOCAB_SIZE": profile.vocab_size}
        sp = load_space(os.path.join(ROOT, "search_space.yaml"), name, consts)
        rng = random.Random(0)
        valid = [c for c in (sp.sample(rng) for _ in range(200)) if not sp.violations(consts | c)]
        assert valid, name  # the space is not over-constrained


@pytest.mark.parametrize("params,constraints,message", [
    ({"NOPE": {"choices": [1]}}, [], "NOPE: train.py has no top-level constant NOPE"),
    ({"DEPTH": {"choices": []}}, [], "DEPTH: choices must be a non-empty list"),
    ({"DEPTH": {"choices": [4, "8"]}}, [], "choice '8' is a str, but train.py's DEPTH is a int"),
    ({"DEPTH": {"low": 2, "high": 12}}, [], "DEPTH is an integer; add int: true"),
    ({"LR": {"low": 0.1, "high": 0.01}}, [], "low .0.1. must be below high"),
    ({"LR": {"low": 0, "high": 1, "log": True}}, [], "log range needs low > 0"),
    ({"NAME": {"low": 1, "high": 2}}, [], "NAME is 'SSSL', not a number"),
    ({"LR": {"min": 1}}, [], "LR: expected"),
    ({"LR": {"low": 0.01, "high": 0.1}}, ["TOTAL % (BATCH * MAX_SEQ_LEN) =="], "cannot be used"),
    ({"LR": {"low": 0.01, "high": 0.1}}, ["__import__('os').system('x') == 0"], "is not allowed"),
    ({"LR": {"low": 0.01, "high": 0.1}}, ["LR.real > 0"], "is not allowed"),
    ({"LR": {"low": 0.01, "high": 0.1}}, ["UNKNOWN > 0"], "unknown name UNKNOWN"),
    ({"LR": {"low": 0.01, "high": 0.1}}, ["BATCH > 100"], "current values break"),
])
def test_bad_spaces_name_the_entry(params, constraints, message):
    with pytest.raises(SpaceError, match=message):
        space(params, constraints)


def test_space_file_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("p: [unclosed")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(str(path), "p", CONSTANTS)
    path.write_text(yaml.safe_dump({"other": {"params": {"LR": {"choices": [0.1]}}}}))
    with pytest.raises(SpaceError, match="no section for profile 'p'"):
        load_space(str(path), "p", CONSTANTS)
    with pytest.raises(SpaceError, match="no search space file"):
        load_space(str(tmp_path / "missing.yaml"), "p", CONSTANTS)


def test_sampling_and_mutation_stay_in_the_space():
    sp = space({"LR": {"low": 0.001, "high": 0.1, "log": True},
                "DEPTH": {"low": 2, "high": 12, "int": True},
                "BETAS": {"choices": [[0.8, 0.95], [0.9, 0.99]]},
                "BATCH": {"choices": [16, 32, 64, 128]}},
               ["TOTAL % (BATCH * MAX_SEQ_LEN) == 0"])
    rng = random.Random(1)
    base = {"LR": 0.04, "DEPTH": 8, "BETAS": (0.8, 0.95), "BATCH": 64}
    for _ in range(300):
        s = sp.sample(rng)
        assert all(sp.params[k].contains(v) for k, v in s.items())
        assert isinstance(s["DEPTH"], int) and isinstance(s["BETAS"], tuple)
        changes = sp.mutate(base, rng)
        assert 2 <= len(changes) <= 3 and all(base[k] != v for k, v in changes.items())
        assert all(sp.params[k].contains(v) for k, v in changes.items())
    assert sp.violations(CONSTANTS | {"BATCH": 256}) == ["TOTAL % (BATCH * MAX_SEQ_LEN) == 0"]
    assert sp.violations(CONSTANTS | {"BATCH": 128}) == []
