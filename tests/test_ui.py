"""What a person sees in the MLflow UI: a real ``mlflow server`` driven by headless Chromium.

The store holds what a new user makes first: two ``tardis-exp`` runs that differ by one
override and a 3-trial ``sweep=k_range`` (small synthetic data), all through the real
command line. A real ``mlflow server`` on 127.0.0.1 serves it; Debian's ``chromium``,
driven by Playwright's Python API (no browser download), opens the pages a person would
-- first the URLs docs/tracking-ui.md and the README show, read from them, in a fresh
profile, with the one documented click (the Assistant panel's Close) -- and the test asserts on the rendered text and images: the run names in the runs table,
a headline metric column, a figure in a run's artifacts, and the compare view of the two
runs, whose parameter diff is the one override. Screenshots go to ``$TARDIS_UI_SHOTS``
(default: the test's temporary folder); docs/img/ holds reviewed copies.

Skips only when no chromium executable is installed (``scripts/install_browser.sh``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from _ports import free_port

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # the skip below says why
    PlaywrightTimeout = TimeoutError

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("TARDIS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
SMALL = ["data.n_spots=600", "data.n_genes=500", "data.n_programs=3", "factorize.n_replicates=3",
         "consensus.n_resamples=10", "preprocess.n_top_genes=300"]
# what docs/tracking-ui.md's URLs are written against; the test's server replaces it
DOC_SERVER, DOC_EXPERIMENT = "http://127.0.0.1:5000", "<experiment id>"
HEADLINE_METRICS = ("best_k", "consensus.pac", "consensus.silhouette", "reconstruction_error")
# the left bar of MLflow's GenAI view; none of it in the model-training view
GENAI_NAV = ("Judges", "Evaluation runs", "Prompts", "Training runs")

# under CI (CI=true, .ci/run installs chromium) a missing browser is a failure, not a skip
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true", reason="no chromium executable (install it with "
                                                          "scripts/install_browser.sh: apt-get install chromium)")]


def documented_urls() -> dict[str, str]:
    """The runs-table URLs docs/tracking-ui.md shows ("plain", "headline"), as written.

    The README gives the headline URL's query string inline; it must be the docs' one.
    """
    text = (ROOT / "docs" / "tracking-ui.md").read_text()
    blocks = [m[2] for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]  # fenced, in pairs
    urls = [line.strip() for b in blocks for line in b.splitlines()
            if line.strip().startswith(f"{DOC_SERVER}/#/experiments/{DOC_EXPERIMENT}/runs")]
    plain = [u for u in urls if "viewStateShareKey" not in u]
    headline = [u for u in urls if "viewStateShareKey=headline" in u]
    assert len(plain) == 1 and len(headline) == 1, urls
    readme = re.findall(r"`(\?[^`]*viewStateShareKey=headline[^`]*)`", (ROOT / "README.md").read_text())
    assert readme == ["?" + headline[0].split("?", 1)[1]], (readme, headline)
    return {"plain": plain[0], "headline": headline[0]}


def on_server(url: str, server: str, exp: str) -> str:
    assert url.startswith(DOC_SERVER + "/") and url.count(DOC_EXPERIMENT) == 1, url
    return server + url[len(DOC_SERVER):].replace(DOC_EXPERIMENT, exp)


def close_assistant(pg, timeout_ms: int = 15_000) -> bool:
    """The click docs/tracking-ui.md documents: the MLflow Assistant panel, which MLflow 3.18
    opens on a local server's first visit, shut with its Close (x) button. True if it was open."""
    close = pg.get_by_role("button", name="Close", exact=True)
    try:
        close.wait_for(state="visible", timeout=timeout_ms)
    except PlaywrightTimeout:
        return False
    close.click()
    close.wait_for(state="hidden")
    return True


def uncovered(pg, cols) -> dict[str, bool]:
    """For each column name: its header is on screen and the topmost element at its centre."""
    return pg.evaluate("""cols => Object.fromEntries(cols.map(c => [c,
        [...document.querySelectorAll('[role=columnheader]')].filter(h => h.innerText.trim() === c).some(h => {
            const r = h.getBoundingClientRect();
            const e = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
            return r.width > 0 && e !== null && h.contains(e); })]))""", list(cols))


def header_texts(pg, want, timeout_s: float = 30.0) -> list[str]:
    """The column headers' texts once every one of ``want`` is rendered (the grid adds the
    parameter columns after the metric ones), or as they are after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        heads = [h.strip() for h in pg.get_by_role("columnheader").all_inner_texts()]
        if set(want) <= set(heads) or time.monotonic() > deadline:
            return heads
        time.sleep(0.5)


def assert_model_training_view(pg) -> None:
    lines = set(pg.locator("body").inner_text().splitlines())
    assert not lines & set(GENAI_NAV), sorted(lines & set(GENAI_NAV))  # GenAI's left bar


def tardis(root: Path, *args: str) -> None:
    env = dict(os.environ, TARDIS_EXP_PROGRESS="0", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("MLFLOW_TRACKING_URI", None)
    flags = [a for a in args if a == "-m"]  # Hydra's flags before the overrides
    args = [a for a in args if a != "-m"]
    p = subprocess.run([sys.executable, "-m", "tardis_exp", *flags, f"paths.root_dir={root}", *args], cwd=root, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"tardis-exp failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two runs differing by ``factorize.n_components`` and a 3-trial sweep, in one SQLite store."""
    root = tmp_path_factory.mktemp("ui")
    tardis(root, *SMALL)
    tardis(root, *SMALL, "factorize.n_components=6")
    tardis(root, "-m", "sweep=k_range", f"hydra.sweep.dir={root}/multirun", "hydra.sweeper.n_trials=3",
           "hydra.sweeper.params={factorize.n_components:'int(interval(4, 6))'}", *SMALL)
    from mlflow import MlflowClient

    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tardis-exp")
    runs = [r for r in client.search_runs([exp.experiment_id]) if "stage" not in r.data.tags]
    return {"root": root, "uri": uri, "client": client, "exp": exp.experiment_id,
            "default": sorted((r for r in runs if "optuna_trial" not in r.data.tags
                               and r.data.tags.get("optuna.role") != "study"), key=lambda r: r.info.start_time),
            "study": next(r for r in runs if r.data.tags.get("optuna.role") == "study"),
            "trials": sorted((r for r in runs if "optuna_trial" in r.data.tags),
                             key=lambda r: int(r.data.tags["optuna_trial"]))}


@pytest.fixture(scope="module")
def server(store):
    port = free_port()
    log = open(store["root"] / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", store["uri"], "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (store["root"] / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "mlflow server did not answer /health"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: our own group
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    # a fresh profile each test: what a new user's browser holds (nothing)
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    ctx.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = Path(os.environ.get("TARDIS_UI_SHOTS") or tmp_path_factory.mktemp("shots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_documented_urls_open_the_model_training_view(store, server, page, shots):
    urls = {k: on_server(u, server, store["exp"]) for k, u in documented_urls().items()}
    a, b = (r.info.run_name for r in store["default"])
    study = store["study"].info.run_name
    assert a != b and "n_components=6" in b.split()[:3] and "n_components" not in a
    # the README's URL first, in a browser that never saw this server
    pg = page
    pg.goto(urls["headline"], wait_until="load")
    pg.get_by_role("link", name=study, exact=True).first.wait_for()
    assert_model_training_view(pg)
    # MLflow 3.18 opens its Assistant over the table on a first local visit; the documented
    # click closes it (docs/tracking-ui.md); if this fails, MLflow changed: update that page
    assert close_assistant(pg), "the Assistant panel did not open: docs/tracking-ui.md says it does"
    # the headline metric columns, no clicks: on screen, nothing over them
    assert uncovered(pg, HEADLINE_METRICS) == {c: True for c in HEADLINE_METRICS}
    heads = header_texts(pg, (*HEADLINE_METRICS, "factorize.n_components", "consensus.max_clusters"))
    for col in (*HEADLINE_METRICS, "factorize.n_components", "consensus.max_clusters"):
        assert col in heads, heads
    time.sleep(1)
    pg.screenshot(path=str(shots / "runs_table.png"))
    # the study row sits in the same columns as the runs (its best trial's values)
    text = pg.locator("body").inner_text().split()
    for r in (*store["default"], store["study"]):
        assert f"{int(r.data.metrics['best_k'])}" in text, r.info.run_name

    # the plain URL, next page of the same browser: model training, each run a link with its
    # name, and the Assistant stays closed (the browser remembered the click)
    pg = pg.context.new_page()
    pg.goto(urls["plain"], wait_until="load")
    for name in (a, b, study):
        pg.get_by_role("link", name=name, exact=True).first.wait_for()
    assert_model_training_view(pg)
    assert not close_assistant(pg, timeout_ms=5_000)

    # the trials, named after what the sampler chose: the study run's page lists them
    pg = pg.context.new_page()
    pg.goto(f"{server}/#/experiments/{store['exp']}/runs/{store['study'].info.run_id}"
            "?workflowType=machine_learning", wait_until="load")
    pg.get_by_text("Child runs", exact=True).first.wait_for()
    assert not close_assistant(pg, timeout_ms=5_000)  # closed on the first page already
    for t in store["trials"]:
        v = t.data.params
        name = t.info.run_name
        assert name == (f"trial {t.data.tags['optuna_trial']} · n_components={v['factorize.n_components']} · "
                        f"K {v['consensus.min_clusters']}..{v['consensus.max_clusters']}")
        pg.get_by_text(name, exact=True).first.wait_for()
    pg.screenshot(path=str(shots / "trials.png"))


def test_figure_in_the_artifacts(store, server, page, shots):
    pg = page
    run = store["default"][0]
    pg.goto(f"{server}/#/experiments/{store['exp']}/runs/{run.info.run_id}/artifacts?workflowType=machine_learning",
            wait_until="load")
    close_assistant(pg)  # a fresh browser: the documented click
    pg.get_by_text("plots", exact=True).first.click()
    pg.get_by_text("k_selection.png", exact=True).first.click()
    pg.get_by_text("plots/k_selection.png", exact=True).first.wait_for()
    # the PNG is fetched from the server and shown decoded (a blob: URL)
    pg.wait_for_function("Array.from(document.images).some(i => i.complete && i.naturalWidth > 300)")
    size = pg.evaluate("Array.from(document.images).map(i => [i.naturalWidth, i.naturalHeight])"
                       ".sort((a, b) => b[0] - a[0])[0]")
    from PIL import Image

    local = Image.open(store["root"] / "mlruns" / "artifacts" / run.info.run_id / "artifacts" / "plots"
                       / "k_selection.png")
    assert tuple(size) == local.size  # the figure the run logged, at its own size
    pg.screenshot(path=str(shots / "artifact_figure.png"))


def test_compare_two_runs_shows_the_one_override(store, server, page, shots):
    pg = page
    ids = [r.info.run_id for r in store["default"]]
    q = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([store["exp"]])})
    pg.goto(f"{server}/#/compare-runs?{q}", wait_until="load")
    pg.get_by_text("factorize.n_components", exact=True).first.wait_for()
    close_assistant(pg)  # a fresh browser: the documented click
    for r in store["default"]:
        pg.get_by_text(r.info.run_name, exact=True).first.wait_for()
    # "Show diff only": the one param that differs, nothing from the run plumbing
    pg.get_by_text("Show diff only", exact=True).first.click()
    time.sleep(1)
    pg.screenshot(path=str(shots / "compare.png"), full_page=True)
    body = pg.locator("body").inner_text()
    # the Parameters table of the run details, diff only: one row, the override, one value per run
    params = body.split("\nParameters\nShow diff only\n", 1)[1].split("\nMetrics\n", 1)[0]
    values = [r.data.params["factorize.n_components"] for r in store["default"]]
    assert params.strip().splitlines() == ["\t".join(["factorize.n_components", *values])], params
