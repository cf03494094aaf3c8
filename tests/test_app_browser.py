"""End-to-end test of the dashboard in a real browser (issue 3).

Starts ``streamlit run app.py`` on a free localhost port, as a new user with no data of their own
(an empty data folder, so the default dataset is the offline ``digits``), and drives Debian's
Chromium (``/usr/bin/chromium``) through Playwright's Python package: open the home page, run the
quick demo, watch the live curves, check the before/after figure and summary table, then open the
Runs page from the sidebar and check that the stored runs are listed. Screenshots land in
``test-output/browser/`` at the repository root, next to the server's log.

Where Chromium or Playwright is missing the test skips, saying why; under CI (``CI=true``) it fails
instead, so a broken install is noticed. ``.ci/run`` installs both.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "test-output" / "browser"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_START_S = 90  # streamlit answering on its health endpoint
DEMO_S = 240  # the quick demo on digits, from the click to "finished"
UI_S = 30  # ordinary page elements (ms below)
VIEWPORT = {"width": 1400, "height": 1000}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _unavailable(reason: str):
    """Skip locally; fail under CI, where .ci/run should have installed the browser and driver."""
    if _in_ci():
        pytest.fail(f"{reason} (CI=true: the browser test must run in CI; check .ci/run's install)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, n: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as exc:
        return f"(no server log: {exc})"


@pytest.fixture
def sync_playwright():
    if not Path(CHROMIUM).exists():
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _unavailable(f"the Python package 'playwright' is missing ({exc}); pip install -r requirements-dev.txt")
    return sync_playwright


@pytest.fixture
def server(tmp_path):
    """The dashboard on a free localhost port; yields (url, runs_dir); always stopped afterwards."""
    OUT.mkdir(parents=True, exist_ok=True)
    runs_dir, data_dir = tmp_path / "runs", tmp_path / "data"
    runs_dir.mkdir()
    data_dir.mkdir()  # empty: a new user with no data, so the default dataset is the offline digits
    port = _free_port()
    env = dict(os.environ, BDFT_RUNS_DIR=str(runs_dir), BDFT_DATA_DIR=str(data_dir),
               BDFT_THREADS=os.environ.get("BDFT_THREADS", "2"), PYTHONUNBUFFERED="1")
    # No Streamlit settings here: the app runs with what .streamlit/config.toml ships, as a user's does
    # (no file watcher, no collection after every rerun; test_app.py checks both are set).
    env = {k: v for k, v in env.items() if not k.startswith("STREAMLIT_")}
    log_path = OUT / "streamlit.log"
    cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with code {proc.returncode} before answering on {url}; "
                            f"its log:\n{_log_tail(log_path)}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit did not answer on {url} within {SERVER_START_S} s; "
                            f"its log:\n{_log_tail(log_path)}")
            time.sleep(0.5)
        yield url, runs_dir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _no_errors(page, where: str) -> None:
    """Neither an uncaught exception nor an error message (ui.show_error) on the page."""
    exc = page.locator('[data-testid="stException"]')
    assert exc.count() == 0, (f"{where}: the page shows {exc.count()} uncaught exception(s): "
                              f"{exc.first.inner_text()[:1500]}\nserver log:\n{_log_tail(OUT / 'streamlit.log')}")
    err = page.locator('[data-testid="stAlertContentError"]')
    assert err.count() == 0, f"{where}: the page shows an error: {err.first.inner_text()[:1500]}"


def _shot(page, name: str) -> None:
    """A screenshot of the whole page. Streamlit scrolls inside its own container, so Playwright's
    full_page alone stops at the viewport: grow the viewport to the content height for the shot."""
    height = page.evaluate("""() => Math.max(document.documentElement.scrollHeight,
        ...[...document.querySelectorAll('[data-testid="stMain"], [data-testid="stAppViewContainer"], section')]
            .map(e => e.scrollHeight))""")
    height = int(min(max(height, VIEWPORT["height"]), 8000))
    if height > VIEWPORT["height"]:
        page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
        page.wait_for_timeout(700)  # let streamlit and plotly re-lay out
    page.mouse.move(1, 1)  # no hover tooltip in the picture
    page.wait_for_timeout(300)
    page.screenshot(path=str(OUT / name), full_page=True)
    if height > VIEWPORT["height"]:
        page.set_viewport_size(VIEWPORT)


def _stored_runs(runs_dir: Path) -> list[dict]:
    found = []
    for rec in sorted(runs_dir.rglob("run.json")):
        try:
            found.append(json.loads(rec.read_text()))
        except (OSError, ValueError):
            pass
    return found


def test_quick_demo_in_a_real_browser(sync_playwright, server):
    url, runs_dir = server
    t0 = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(UI_S * 1000)

            # Home, as a first-time visitor sees it.
            page.goto(url, wait_until="domcontentloaded")
            page.get_by_role("heading", name="The backdoor fine-tuning lab").wait_for()
            page.get_by_text("A backdoor is a hidden rule", exact=False).first.wait_for()
            page.locator('[data-testid="stImage"]').first.wait_for()  # the trigger picture
            demo_btn = page.get_by_role("button", name="Run the quick demo")
            demo_btn.wait_for()
            assert "digits" in page.locator('[data-testid="stMain"]').inner_text(), \
                "with an empty data folder the quick demo should run on the offline 'digits'"
            _no_errors(page, "home page")
            _shot(page, "01-home.png")

            # The quick demo: progress and live curves while it runs.
            t_click = time.monotonic()
            demo_btn.click()
            page.locator('[data-testid="stProgress"]').first.wait_for(timeout=60_000)
            page.locator(".js-plotly-plot").first.wait_for(timeout=DEMO_S * 1000)
            _shot(page, "02-home-demo-running.png")

            # Wait (bounded) for the job to end, and fail early and readably if it failed.
            end = page.get_by_text(re.compile(r"Quick demo on \w+ — (finished|failed|stopped)"))
            try:
                end.first.wait_for(timeout=max(1.0, DEMO_S - (time.monotonic() - t_click)) * 1000)
            except Exception as exc:
                _shot(page, "03-home-demo-timeout.png")
                pytest.fail(f"the quick demo did not finish within {DEMO_S} s ({type(exc).__name__}); "
                            f"server log:\n{_log_tail(OUT / 'streamlit.log')}")
            status = end.first.inner_text()
            demo_s = time.monotonic() - t_click
            # The page reruns once when the job ends; let the results render.
            page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=UI_S * 1000)
            page.wait_for_timeout(1500)
            _shot(page, "03-home-demo-finished.png")
            main = page.locator('[data-testid="stMain"]').inner_text()
            assert "finished" in status, f"the demo ended '{status}'; page says:\n{main[-3000:]}"
            _no_errors(page, "home page after the demo")

            # Live curves + the before/after bars (both plotly), the caption, and the summary table.
            charts = page.locator('[data-testid="stPlotlyChart"]')
            assert charts.count() >= 2, f"expected the curves and the before/after figure, found {charts.count()}"
            assert page.locator(".js-plotly-plot").count() >= 2
            for c in range(2):
                assert charts.nth(c).locator(".main-svg").count() > 0, f"plotly chart {c} has not drawn"
            assert "ASR" in main and "CA" in main, f"no CA/ASR labels on the page:\n{main[-3000:]}"
            chart_text = " ".join(charts.nth(c).inner_text() for c in range(charts.count()))
            assert re.search(r"\d+(\.\d+)?%", chart_text + main), \
                f"no percentages shown; charts say: {chart_text[:1000]}"
            table = page.locator('[data-testid="stDataFrame"]').first
            assert table.is_visible()
            table_text = table.text_content()  # glide-data-grid keeps a hidden accessible copy of the cells
            for word in ("CA", "ASR"):
                assert word in table_text, f"summary table lacks a '{word}' column: {table_text[:800]}"
            assert re.search(r"\d+\.\d%", table_text), f"summary table shows no percentages: {table_text[:800]}"

            runs = _stored_runs(runs_dir)
            assert len(runs) >= 3, f"the demo should store the poisoned run and FT/SFT runs, found {len(runs)}"

            # Runs page, through the sidebar navigation.
            nav = page.locator('[data-testid="stSidebarNav"]')
            nav.get_by_role("link").filter(has_text="Runs").first.click()
            page.get_by_role("heading", name="Runs").wait_for()
            page.locator('[data-testid="stDataFrame"]').first.wait_for()
            page.wait_for_timeout(1500)
            assert page.url.rstrip("/").endswith("/runs"), f"navigation went to {page.url}"
            _shot(page, "04-runs.png")
            _no_errors(page, "runs page")
            runs_main = page.locator('[data-testid="stMain"]').inner_text()
            assert "No runs stored yet" not in runs_main
            runs_table = page.locator('[data-testid="stDataFrame"]').first.text_content()
            for r in runs:
                assert r["id"] in runs_table, f"run {r['id']} is not listed on the Runs page: {runs_table[:1500]}"
        finally:
            browser.close()
    log = _log_tail(OUT / "streamlit.log", 200_000)
    assert "Inotify queue overflowed" not in log, \
        "Streamlit's file watcher is on and flooding (it costs a core and slows every job): " + log[-1500:]
    print(f"\nbrowser test: demo finished {demo_s:.0f} s after the click, whole test {time.monotonic() - t0:.0f} s; "
          f"screenshots in {OUT}")
