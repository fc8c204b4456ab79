"""Drive the MLflow UI (a React single-page app, hash routes) in the system's Chromium with
Playwright's sync API: never `playwright install`; the browser is /usr/bin/chromium.

    open_runs_ui(link, credentials, experiment_id, run_ids, screenshot_dir, artifact=...) -> dict

opens a runs-table link as the project prints it, the compare view of the runs and an
artifact on its run's page, waits for their content, saves a PNG of each page and returns
what the pages show.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import quote

import requests

CHROMIUM = "/usr/bin/chromium"
#: The runs table's count line, as MLflow words it for 0, 1 and many runs.
MATCHING = re.compile(r"\b\d+ matching runs?\b")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
TIMEOUT_MS = 60_000
# Scroll every scrolled panel of the page one screen down.
SCROLL_DOWN = """() => document.querySelectorAll('*').forEach(e => {
    if (['auto', 'scroll'].includes(getComputedStyle(e).overflowY) && e.scrollHeight > e.clientHeight)
        e.scrollTop += e.clientHeight; })"""


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


def open_runs_ui(link: str, credentials: tuple[str, str] | None, experiment_id: str, run_ids: list[str],
                 screenshot_dir: str | Path, *, compare: list[str] | None = None, metrics: tuple[str, ...] = (),
                 artifact: tuple[str, str] | None = None, name: str = "mlflow-ui",
                 chromium: str = CHROMIUM, viewport: tuple[int, int] = (1920, 1080),
                 timeout_ms: int = TIMEOUT_MS) -> dict:
    """Open `link` (the runs table a sweep or `odenet train` printed) and wait for `run_ids` in it;
    with compare, the compare view of those runs, scrolled until `metrics` show; with
    artifact=(run_id, path), that artifact on its run's page. Returns

        {"run_names": {run_id: name},
         "runs": {"url", "text", "columns", "screenshot", "expanded"},
         "compare": {"url", "text", "columns", "screenshot"},
         "artifact": {"url", "screenshot", "images": [(src, natural width)]},
         "console_errors": [...]}

    where "text" is the page's rendered text (document.body.innerText; table cells are
    tab-separated) and "columns" the table column headers, once every run name has rendered;
    "expanded" says whether a collapsed parent run had to be expanded to show its children.
    """
    from playwright.sync_api import sync_playwright

    tracking_uri = link.split("/#/", 1)[0]
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

            # The runs table as the link opens it; a parent run MLflow shows collapsed is expanded.
            page.goto(link)
            # "N matching runs", or "1 matching run" once a single run has loaded: waiting for the
            # plural alone passed only when the page was caught at "0 matching runs" on the way
            page.get_by_text(MATCHING).first.wait_for()
            links = {run_id: page.locator("[role=gridcell]").get_by_role("link", name=run_name, exact=True).first
                     for run_id, run_name in names.items()}
            page.wait_for_function("() => !/(^|\\D)0 matching runs/.test(document.body.innerText)")
            page.locator("[role=gridcell] a").first.wait_for()
            expanded = False
            if not all(run_link.is_visible() for run_link in links.values()):
                for run_link in [run_link for run_link in links.values() if run_link.is_visible()]:
                    expander = page.locator("[role=gridcell]", has=run_link).locator(
                        "button[data-component-id*='runnamecellrenderer']")
                    if expander.count():
                        expander.first.click()
                        expanded = True
            for run_link in links.values():
                run_link.wait_for()
            _close_assistant(page)
            result["runs"] = {**_capture(page, page.url, shots / f"{_safe(name)}-runs-{_safe(experiment_id)}.png"),
                              "expanded": expanded}

            if compare:  # run details, parameters and metrics side by side
                url = compare_runs_url(tracking_uri, experiment_id, compare)
                page.goto(url)
                page.get_by_text(f"Comparing {len(compare)} Runs").first.wait_for()
                for run_id in compare:
                    page.get_by_text(names[run_id], exact=True).first.wait_for()
                page.get_by_text("Parameters", exact=True).first.wait_for()
                page.get_by_text("Metrics", exact=True).first.wait_for()
                for metric in metrics:  # the metrics table renders only the rows in its scrolled window
                    shown = page.get_by_text(metric, exact=True)
                    for _ in range(50):
                        if shown.count():
                            break
                        page.evaluate(SCROLL_DOWN)
                        page.wait_for_timeout(200)
                    shown.first.wait_for()
                _close_assistant(page)
                result["compare"] = _capture(page, url, shots / f"{_safe(name)}-compare-{_safe(experiment_id)}.png")

            if artifact:
                run_id, path = artifact
                url = (f"{tracking_uri}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{path}"
                       "?workflowType=machine_learning")
                page.goto(url)
                page.wait_for_function("() => Array.from(document.images).some(i => i.complete && i.naturalWidth > 0"
                                       " && (i.src.startsWith('blob:') || i.src.includes('get-artifact')))")
                _close_assistant(page)
                shot = shots / f"{_safe(name)}-artifact-{_safe(Path(path).stem)}.png"
                page.screenshot(path=str(shot))
                images = page.evaluate("() => Array.from(document.images).map(i => [i.src, i.naturalWidth])")
                result["artifact"] = {"url": url, "screenshot": str(shot), "images": images}
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
