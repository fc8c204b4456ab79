"""Drive the MLflow UI (a React single-page app, hash routes) in the system's Chromium with
Playwright's sync API: never `playwright install`; the browser is /usr/bin/chromium.

    open_runs_ui(tracking_uri, credentials, experiment_id, run_ids, screenshot_dir) -> dict

opens the experiment's runs table (with every metric and parameter column shown) and the
compare view of the runs, waits for their content, saves a PNG of each page and returns
what the pages show.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import quote

import requests

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
TIMEOUT_MS = 60_000


def experiment_runs_url(tracking_uri: str, experiment_id: str) -> str:
    """The runs table of an experiment (MLflow 3 opens a GenAI overview at #/experiments/ID)."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs"


def compare_runs_url(tracking_uri: str, experiment_id: str, run_ids: list[str]) -> str:
    """The compare view, as the UI itself links it: #/compare-runs?runs=[JSON]&experiments=[JSON]."""
    runs, experiments = quote(json.dumps(list(run_ids))), quote(json.dumps([str(experiment_id)]))
    return f"{tracking_uri.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"


def run_names(tracking_uri: str, credentials: tuple[str, str] | None, run_ids: list[str]) -> dict[str, str]:
    """run_id -> run name, from the REST API: what the pages must show before they count as loaded."""
    names = {}
    for run_id in run_ids:
        response = requests.get(f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/runs/get", params={"run_id": run_id},
                                auth=credentials, timeout=30)
        response.raise_for_status()
        names[run_id] = response.json()["run"]["info"]["run_name"]
    return names


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def open_runs_ui(tracking_uri: str, credentials: tuple[str, str] | None, experiment_id: str, run_ids: list[str],
                 screenshot_dir: str | Path, *, name: str = "mlflow-ui", chromium: str = CHROMIUM,
                 viewport: tuple[int, int] = (1920, 1080), timeout_ms: int = TIMEOUT_MS) -> dict:
    """Open the experiment page and the compare view of `run_ids`; returns

        {"run_names": {run_id: name},
         "experiment": {"url", "text", "columns", "screenshot"},
         "compare": {"url", "text", "columns", "screenshot"},
         "console_errors": [...]}

    where "text" is the page's rendered text (document.body.innerText; table cells are
    tab-separated) and "columns" the table column headers, once every run name (and, on
    the experiment page, the metric and parameter columns) has rendered.
    """
    from playwright.sync_api import sync_playwright

    names = run_names(tracking_uri, credentials, run_ids)
    shots = Path(screenshot_dir)
    shots.mkdir(parents=True, exist_ok=True)
    result: dict = {"run_names": names, "console_errors": []}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(
                http_credentials={"username": credentials[0], "password": credentials[1]} if credentials else None,
                viewport={"width": viewport[0], "height": viewport[1]})
            context.set_default_timeout(timeout_ms)
            page = context.new_page()
            page.on("console", lambda m: m.type == "error" and result["console_errors"].append(m.text))

            # The experiment's runs table. Metric and parameter columns are hidden until chosen
            # in "Columns"; tick both groups so the table shows them.
            url = experiment_runs_url(tracking_uri, experiment_id)
            page.goto(url)
            for run_name in names.values():
                page.get_by_role("link", name=run_name, exact=True).first.wait_for()
            _close_assistant(page)
            page.get_by_role("button", name="Columns").click()
            for group in ("Metrics", "Parameters"):
                node = page.locator(f"[class*='tree-treenode']:has([title^='{group}'])").first
                node.wait_for()
                if "checkbox-checked" not in (node.get_attribute("class") or ""):
                    node.locator("[class*='tree-checkbox']").first.click()
            page.keyboard.press("Escape")
            page.get_by_role("columnheader", name="Metrics").first.wait_for()
            page.get_by_role("columnheader", name="Parameters").first.wait_for()
            result["experiment"] = _capture(page, url, shots / f"{_safe(name)}-experiment-{_safe(experiment_id)}.png")

            # The compare view: run details, parameters and metrics side by side.
            url = compare_runs_url(tracking_uri, experiment_id, run_ids)
            page.goto(url)
            page.get_by_text(f"Comparing {len(run_ids)} Runs").first.wait_for()
            for run_name in names.values():
                page.get_by_text(run_name, exact=True).first.wait_for()
            page.get_by_text("Parameters", exact=True).first.wait_for()
            page.get_by_text("Metrics", exact=True).first.wait_for()
            _close_assistant(page)
            result["compare"] = _capture(page, url, shots / f"{_safe(name)}-compare-{_safe(experiment_id)}.png")
        finally:
            browser.close()
    return result


def _close_assistant(page) -> None:
    """MLflow 3.17 opens an "MLflow Assistant" side panel a moment after the page; close it
    so that the runs table gets the width for its metric and parameter columns."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    close = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']").first
    try:
        close.wait_for(state="visible", timeout=5_000)
    except PlaywrightTimeout:
        return  # not shown in this build or session
    close.click()
    close.wait_for(state="hidden")


def _capture(page, url: str, screenshot: Path) -> dict:
    """The page's text and column headers, and a PNG of all of it.

    The UI scrolls inside a panel, not the document, so a full-page screenshot would stop at
    the window: grow the window to the panel's content for the picture, then restore it."""
    frames = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
    page.evaluate(frames)  # the UI polls the server, so wait for paint, not for an idle network
    size = page.viewport_size
    hidden = page.evaluate("""() => Math.max(0, ...Array.from(document.querySelectorAll('*'))
        .filter(e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowY))
        .map(e => e.scrollHeight - e.clientHeight))""")
    if hidden > 0:
        page.set_viewport_size({"width": size["width"], "height": min(size["height"] + hidden + 20, 8000)})
        page.evaluate(frames)
    page.screenshot(path=str(screenshot), full_page=True)
    page.set_viewport_size(size)
    headers = page.get_by_role("columnheader").all_inner_texts()
    return {"url": url, "text": page.evaluate("document.body.innerText"), "screenshot": str(screenshot),
            "columns": [h.strip() for h in headers if h.strip()]}
