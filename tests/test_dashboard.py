"""The live view: `loop.py dashboard` on the study a real loop wrote, rendered by headless
Chromium (the page, not only the API), and its errors; the notebook's threaded server."""
import html.parser
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import optuna
import pandas as pd
import pytest

from autoresearch import dashboard
from autoresearch.storage import open_storage, study_location
from conftest import ROOT, skip_or_fail_in_ci

LOOP = os.path.join(ROOT, "loop.py")
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome",
                                                "chrome"))), None)
# The study's states as optuna-dashboard names them.
STATE_NAMES = {"COMPLETE": "Complete", "FAIL": "Fail", "PRUNED": "Pruned", "RUNNING": "Running",
               "WAITING": "Waiting"}


def loop_cli(args, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, LOOP, *args], cwd=cwd,
                          env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                          timeout=timeout)


class _Text(html.parser.HTMLParser):
    """The text a page shows: every text node outside style and script, space-separated."""

    def __init__(self):
        super().__init__()
        self.parts, self._skip = [], 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("style", "script")

    def handle_endtag(self, tag):
        self._skip -= tag in ("style", "script") and self._skip > 0

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.parts.append(data.strip())


def page_text(dom):
    parser = _Text()
    parser.feed(dom)
    return " ".join(parser.parts)


def render(url, profile_dir, ready):
    """The DOM of url after headless Chromium ran its scripts (the dashboard is a React app that
    fetches the study from its API); tried again (at most 3 times) while the text `ready` is not
    on the page yet, as a loaded machine can run out of the virtual time budget first."""
    for _ in range(3):
        proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                               "--disable-dev-shm-usage", "--no-first-run",
                               f"--user-data-dir={profile_dir}", "--window-size=1400,3000",
                               "--virtual-time-budget=20000", "--dump-dom", url],
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-2000:]
        if ready in page_text(proc.stdout):
            break
    return proc.stdout


def learning_curves(dom):
    """The intermediate values plot as Plotly drew it: {legend name: markers drawn}, and the axis
    titles (the legend lists the traces in the order they are drawn)."""
    start = dom.find('id="graph-intermediate-values"')
    if start < 0:
        return {}, []
    end = dom.find("<h6", start)
    plot = dom[start:end if end > 0 else None]
    names = [n.strip() for n in re.findall(r'class="legendtext"[^>]*>([^<]*)<', plot)]
    points = [t.count('class="point"') for t in plot.split('<g class="trace scatter')[1:]]
    axes = re.findall(r'<text class="[xy]title"[^>]*>([^<]*)<', plot)
    return dict(zip(names, points)), axes


LOOP_ARGS = ["--budget", "30", "--baseline-runs", "2"]  # the study: results.journal


@pytest.fixture
def chromium():
    if CHROMIUM is None:
        skip_or_fail_in_ci("no chromium here (Debian: apt-get install chromium)")
    return CHROMIUM


@pytest.mark.slow
def test_the_dashboard_of_a_real_loop_renders_its_trials_states_and_curves(tmp_path, smoke_data,
                                                                           chromium):
    """The real train.py on the smoke profile, six runs: two of the baseline, then one-constant
    steps of which HEAD_DIM=33 crashes (train.py refuses an odd head width) and a slower
    learning rate is stopped early; `loop.py dashboard` on the study beside results.tsv, each
    page loaded in headless Chromium."""
    shutil.copy(os.path.join(ROOT, "train.py"), tmp_path / "train.py")
    (tmp_path / "search_space.yaml").write_text(
        "smoke:\n  mutate: [1, 1]\n  params:\n    HEAD_DIM: {choices: [32, 33]}\n"
        "    MATRIX_LR: {low: 0.01, high: 0.1, log: true}\n")
    env = {"AUTORESEARCH_DATA": smoke_data.dir, "AUTORESEARCH_STEPS": "20"}
    loop = loop_cli(LOOP_ARGS + ["--trials", "6"], tmp_path, env)
    assert loop.returncode == 0, loop.stderr[-3000:]
    df = pd.read_csv(tmp_path / "results.tsv", sep="\t")
    assert len(df) == 6 and "crash" in df.status.tolist(), df[["trial", "status", "description"]]

    # What the page must show, from the study itself.
    location = study_location(str(tmp_path / "results.tsv"))
    study = optuna.load_study(study_name="autoresearch", storage=open_storage(location))
    trials = {t.number: t for t in study.trials}
    assert sorted(trials) == df.trial.tolist()
    # optuna-dashboard 0.21 draws the curves of complete and running trials, and of pruned
    # trials that have a value; not of failed ones.
    curves = {f"trial #{n}" + (" (running)" if t.state.name == "RUNNING" else "")
              for n, t in trials.items() if len(t.intermediate_values) >= 2 and (
                  t.state.name in ("COMPLETE", "RUNNING")
                  or t.state.name == "PRUNED" and t.value is not None)}

    server = subprocess.Popen([sys.executable, LOOP, "dashboard", "--results", "results.tsv",
                               "--port", "0"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/dashboard/studies/(\d+))", line)
        assert match and "Ctrl-C stops it" in line, (line, server.stderr.read()
                                                     if server.poll() is not None else "")
        url, study_id = match.group(1), int(match.group(2))
        assert study_id == study._study_id

        # The trial list: every run, with its state.
        dom = render(url + "/trials", tmp_path / "chromium", f"{len(df)} Trials")
        text = page_text(dom)
        assert f"{len(df)} Trials" in text, text[:3000]
        for row in df.itertuples():
            state = STATE_NAMES[trials[row.trial].state.name]
            if row.status == "crash":
                assert state == "Fail"
            elif row.status == "pruned":
                assert state == "Pruned"
            elif row.status in ("keep", "discard", "retest"):
                assert state == "Complete"
            assert f"Trial {row.trial} {state}" in text, (row.trial, row.status, text[:3000])
        assert "Fail" in text and "Complete" in text

        # The study's page: the history, importances, timeline and the learning curves.
        dom = render(url, tmp_path / "chromium", "Intermediate values")
        text = page_text(dom)
        assert f"autoresearch (id={study_id})" in text, text[:3000]
        best = df[df.status.isin(["keep", "discard", "retest"])].sort_values("val_bpb").iloc[0]
        assert f"Best Trial (number={best.trial})" in text
        assert "Hyperparameter Importance" in text and "MATRIX_LR" in text
        timeline = text[text.index("Timeline"):]
        assert "Complete" in timeline and "Fail" in timeline
        if any(t.state.name == "PRUNED" for t in trials.values()):
            assert "Pruned" in timeline
        drawn, axes = learning_curves(dom)
        assert curves, "the loop wrote no intermediate values: no learning curve to show"
        assert set(drawn) == curves, (drawn, curves)  # one line per run with a curve
        assert all(2 <= n <= 10 for n in drawn.values()), drawn  # Plotly marks 10 at most
        assert axes == ["Step", "Objective Value"]
        finished = {f"trial #{r.trial}" for r in df.itertuples()
                    if r.status in ("keep", "discard", "retest")}
        assert finished <= set(drawn)

        # A crashed trial's page: what a person opens to see why (its verdict, log tail, diff).
        crash = int(df[df.status == "crash"].trial.iloc[0])
        text = page_text(render(f"{url}/trials?numbers={crash}", tmp_path / "chromium",
                                f"Trial {crash} (trial_id="))
        shown = text[text.index(f"Trial {crash} (trial_id="):]
        assert shown.split()[3] == "Fail", shown[:500]
        assert "User Attributes" in shown and "HEAD_DIM=33 must be a positive even integer" in shown
        for key in ("verdict", "log_tail", "diff", "row"):
            assert f" {key} " in shown, (key, shown[:3000])

        # Live: a run of the loop resumed while the dashboard serves is on the page, unrestarted.
        more = loop_cli(LOOP_ARGS + ["--trials", "1"], tmp_path, env)
        assert more.returncode == 0, more.stderr[-3000:]
        text = page_text(render(url + "/trials", tmp_path / "chromium", f"{len(df) + 1} Trials"))
        assert f"{len(df) + 1} Trials" in text and f"Trial {len(df)} " in text, text[:3000]
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0 and "dashboard stopped" in err, err[-2000:]


def make_study(path):
    """A real study in a journal file: two finished trials and a failed one."""
    study = optuna.create_study(study_name="autoresearch", storage=open_storage(str(path)))
    for x in (1.0, 2.0):
        trial = study.ask({"X": optuna.distributions.FloatDistribution(0, 3)})
        trial.report(x + 1, 50)
        study.tell(trial, x)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    return study


def test_no_study_yet_says_run_the_loop_first_and_creates_nothing(tmp_path):
    proc = loop_cli(["dashboard", "--results", str(tmp_path / "results.tsv"), "--port", "0"],
                    tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "no study at" in proc.stderr and "run `python loop.py` first" in proc.stderr
    assert os.listdir(tmp_path) == []
    with pytest.raises(dashboard.DashboardError, match="no study"):
        dashboard.start(f"sqlite:///{tmp_path / 'results.db'}", port=0)
    assert os.listdir(tmp_path) == []


def test_a_port_in_use_is_a_clear_error(tmp_path):
    make_study(tmp_path / "results.journal")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = loop_cli(["dashboard", "--port", str(port)], tmp_path, timeout=60)
    assert proc.returncode == 2
    assert f"port {port} on 127.0.0.1 is in use" in proc.stderr and "--port" in proc.stderr


def test_started_in_a_thread_it_serves_the_study_until_stopped(tmp_path):
    """The notebook's way: a daemon thread of this process, the URL returned at once."""
    make_study(tmp_path / "results.journal")
    view = dashboard.start(study_location(str(tmp_path / "results.tsv")), port=0)
    try:
        assert re.fullmatch(rf"http://127\.0\.0\.1:{view.port}/dashboard/studies/0", view.url)
        with urllib.request.urlopen(view.url, timeout=30) as r:
            assert r.status == 200 and b"<div id=\"dashboard\">" in r.read()
        api = f"http://127.0.0.1:{view.port}/api/studies/0?after=0"
        with urllib.request.urlopen(api, timeout=30) as r:
            states = [t["state"] for t in json.load(r)["trials"]]
        assert states == ["Complete", "Complete", "Fail"]
    finally:
        view.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(view.url, timeout=5)
