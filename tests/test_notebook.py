"""autoresearch.ipynb executed top to bottom on CPU, twice: the second run resumes."""
import os
import re
import shutil
import subprocess
import sys

import nbformat
import pandas as pd
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # real loops and trainers, minutes each

NOTEBOOK = os.path.join(ROOT, "autoresearch.ipynb")


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1


def execute(path, cwd, **params):
    """The README's headless command: papermill with parameters injected."""
    out = cwd / "executed.ipynb"
    args = [a for k, v in params.items() for a in ("-p", k, str(v))]
    proc = subprocess.run([sys.executable, "-m", "papermill", str(path), str(out), *args,
                           "--cwd", str(cwd), "-k", "python3"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return nbformat.read(out, as_version=4)


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    repo = tmp_path / "autoresearch"
    repo.mkdir()
    for name in ("prepare.py", "train.py", "loop.py", "search_space.yaml", "autoresearch.ipynb"):
        shutil.copy(os.path.join(ROOT, name), repo)
    shutil.copytree(os.path.join(ROOT, "autoresearch"), repo / "autoresearch",
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("AUTORESEARCH_DATA", raising=False)
    # The kernel must be this interpreter, with this environment's packages.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    return repo


def test_notebook_runs_end_to_end_and_resumes(repo_copy):
    nb = execute(repo_copy / "autoresearch.ipynb", repo_copy, PROFILE="smoke", TRIALS=2, BUDGET=2)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs)
    assert "profile: smoke" in text and "val_bpb:" in text and "incumbent:" in text
    assert "baseline: mean val_bpb" in text and "noise floor" in text
    # The dashboard cell, outside Colab: says so, and where the kernel serves the study.
    assert "not in Colab" in text and re.search(r"http://127\.0\.0\.1:\d+/dashboard/studies/0",
                                                text), text[-3000:]
    df = pd.read_csv(repo_copy / "results.tsv", sep="\t")
    assert df.trial.tolist() == [0, 1, 2, 3, 4] and df.description[0] == "baseline"
    assert (df.strategy[:3] == "baseline").all() and df.runs[2] == 3
    assert (df.status != "crash").all()
    assert (repo_copy / "progress.png").read_bytes()[:4] == b"\x89PNG"
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert images  # the plot is shown inline

    nb = execute(repo_copy / "autoresearch.ipynb", repo_copy, PROFILE="smoke", TRIALS=1, BUDGET=2,
                 RECHECK=1)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs)
    assert "baseline already in" in text and "recheck:" in text
    df = pd.read_csv(repo_copy / "results.tsv", sep="\t")
    assert df.trial.tolist()[:6] == [0, 1, 2, 3, 4, 5] and (df.description == "baseline").sum() == 1
    assert len(df) in (6, 8)  # the recheck runs baseline and best once each, if they differ
