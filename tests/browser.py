"""Reviewing MLflow's UI as a person would: a real headless Chromium (Debian's `chromium`,
installed by `make browser`) driven by Playwright.

`review_parent_run` opens a pipeline's parent run the way a new user does and returns what
the pages actually showed (strings read from the DOM), plus screenshots, for a test to assert on.

The links (`experiment_runs_url`, `run_url`) are the project's own, from pipeline.stages.tracking.
MLflow 3.17 opens an experiment in its GenAI view ("Traces 0, no data") unless the link says
`?workflowType=machine_learning`: the UI takes the workflow type from that URL parameter, else
from the browser's local storage, else "genai"; the experiment tag `mlflow.experimentKind` is
not read for it (the flag that would read it is off in 3.17's bundle). So the links carry the
parameter; in the hash router it goes after the route (`/#/experiments/1/runs?workflowType=...`).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

from pipeline.stages.tracking import experiment_runs_url, run_url

# ---------------------------------------------------------------- links (the project's own: pipeline.stages.tracking)
def workflow_type_of(url: str) -> str | None:
    """The `workflowType` a UI URL carries (in the hash route's query), None without one."""
    query = url.split("#", 1)[-1].partition("?")[2]
    return (parse_qs(query).get("workflowType") or [None])[0]


# ---------------------------------------------------------------- what was seen
@dataclass
class ViewSeen:
    """An experiment page as it opened: where the UI took the browser, and what it showed."""

    requested: str
    url: str  # after the UI's own redirects
    workflow_type: str | None  # from the final URL (None where the UI put none there)
    heading: str  # the page's title, e.g. "Runs" (Model training) or "Overview" (GenAI)
    nav: list[str]  # the sidebar's experiment views: ["Runs", "Models", "Traces"] or ["Overview", "Traces", "Sessions", ...]


@dataclass
class RunReview:
    default_view: ViewSeen  # the experiment link without workflowType, in a fresh browser
    runs_view: ViewSeen  # experiment_runs_url(...), in a fresh browser
    runs_collapsed: list[str]  # run names in the runs table before expanding the parent
    runs_expanded: list[str]  # ... after expanding the parent (parent first, then its nested runs)
    child_runs: list[str]  # the run page's "Child runs" links
    artifacts: list[str]  # top-level entries of the run's artifact tree
    table_artifact: str
    table_columns: list[str]  # the table artifact as the artifact viewer shows it
    table_rows: list[list[str]]
    metric_charts: list[str]  # titles of charts on the model-metrics tab that drew a trace; a metric
    # "train/loss" is charted as "loss" in a section "train"
    screenshots: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


# ---------------------------------------------------------------- the browser
class Reviewer:
    """One headless Chromium; each `fresh_page()` is a new browser context (no cookies, no local
    storage): a user who never opened this MLflow before."""

    def __init__(self, browser, screenshot_dir: Path, timeout_ms: int):
        self.browser = browser
        self.screenshot_dir = screenshot_dir
        self.timeout_ms = timeout_ms

    @contextmanager
    def fresh_page(self, width: int = 1600, height: int = 1000):
        context = self.browser.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(self.timeout_ms)
        try:
            yield context.new_page()
        finally:
            context.close()

    def shot(self, page, name: str) -> Path:
        path = self.screenshot_dir / name
        page.screenshot(path=str(path))
        return path


def chromium_path() -> str:
    path = shutil.which("chromium")
    if not path:
        raise RuntimeError("no `chromium` on PATH: `make browser` installs Debian's chromium")
    return path


@contextmanager
def reviewer(screenshot_dir: str | Path, timeout_ms: int = 60_000) -> Iterator[Reviewer]:
    """Headless Chromium (Debian's, via Playwright: Playwright's own browser downloads are not used)."""
    from playwright.sync_api import sync_playwright

    screenshot_dir = Path(screenshot_dir)
    screenshot_dir.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True)
        try:
            yield Reviewer(browser, screenshot_dir, timeout_ms)
        finally:
            browser.close()


# ---------------------------------------------------------------- page steps
_RUN_NAME_CELL = "[role=gridcell][col-id='attributes.`Run Name`']"
_ASSISTANT_CLOSE = "button[data-component-id='mlflow.assistant.chat_panel.close']"
_ARTIFACT_NODE = "[data-testid=artifact-tree-node]"
_CHART_CARD = "[data-testid=experiment-view-compare-runs-card]"
_DRAWN_CHART = f"{_CHART_CARD}:has(.js-plotly-plot .trace)"


def _close_assistant(page) -> None:
    """MLflow 3.17 opens its "MLflow Assistant" side panel for a new user; it covers a third of
    a screenshot. Closed where shown (nothing else depends on it)."""
    close = page.locator(_ASSISTANT_CLOSE)
    if close.count() and close.first.is_visible():
        close.first.click()
        close.first.wait_for(state="detached")


def _open_experiment(page, url: str, experiment_id: str) -> ViewSeen:
    page.goto(url)
    # The UI redirects a bare experiment link to a view of its choice (e.g. overview/usage).
    page.wait_for_url(re.compile(rf"#/experiments/{re.escape(str(experiment_id))}/[a-z]"))
    # The page title is an <h2>; by role it can be hidden: a new user's GenAI overview opens a modal
    # popover ("Detect Issues in Your Traces") that makes the rest of the page aria-hidden.
    heading = page.locator("h2").first
    heading.wait_for()
    nav_links = page.locator(f"aside a[href^='#/experiments/{experiment_id}/']")  # the sidebar's experiment views
    nav_links.first.wait_for()
    nav = [t.strip() for t in nav_links.all_inner_texts()]
    return ViewSeen(url, page.url, workflow_type_of(page.url), heading.inner_text().strip(), nav)


def _run_names_in_table(page) -> list[str]:
    """Run names of the runs table, top to bottom (ag-grid's DOM order is not its row order)."""
    return page.evaluate(
        """sel => [...document.querySelectorAll(sel + ' a')]
            .map(a => [Number(a.closest('[role=row]')?.getAttribute('aria-rowindex') ?? 0), a.innerText.trim()])
            .sort((x, y) => x[0] - y[0]).map(x => x[1])""",
        _RUN_NAME_CELL,
    )


def _expand_parent(page, parent_run_id: str) -> tuple[list[str], list[str]]:
    parent_cell = page.locator(f"{_RUN_NAME_CELL}:has(a[href$='/runs/{parent_run_id}'])")
    parent_cell.wait_for()
    collapsed = _run_names_in_table(page)
    expander = parent_cell.locator("button[data-component-id*='runnamecellrenderer']")
    if not expander.count():  # no nested runs: nothing to expand
        return collapsed, collapsed
    expander.click()
    page.wait_for_function("([sel, n]) => document.querySelectorAll(sel + ' a').length > n", arg=[_RUN_NAME_CELL, len(collapsed)])
    return collapsed, _run_names_in_table(page)


def _read_table(page) -> tuple[list[str], list[list[str]]]:
    table = page.get_by_role("table").first
    table.get_by_role("columnheader").first.wait_for()
    columns = [t.strip() for t in table.get_by_role("columnheader").all_inner_texts()]
    rows = [[c.strip() for c in row.get_by_role("cell").all_inner_texts()] for row in table.get_by_role("row").all()]
    return columns, [r for r in rows if r]


def review_parent_run(tracking_uri: str, experiment_id: str, parent_run_id: str, screenshot_dir: str | Path, *,
                      table_artifact: str = "comparison.json", metrics_run_id: str | None = None,
                      timeout_ms: int = 60_000) -> RunReview:
    """Review a pipeline's parent run in MLflow's UI, as a person would, and return what was seen.

    - the experiment link without workflowType, in a fresh browser (which view does MLflow pick?);
      screenshot mlflow-default-view.png
    - `experiment_runs_url`: the runs table; the parent's nested runs, collapsed then expanded;
      screenshot mlflow-pipeline-runs.png
    - `run_url` of the parent: its "Child runs", its artifacts; the table artifact clicked open in
      the artifact viewer (screenshot mlflow-pipeline-comparison.png)
    - the model-metrics tab of `metrics_run_id` (default: the parent): charts that drew a trace;
      screenshot mlflow-pipeline-metrics.png
    """
    started = time.monotonic()
    eid, pid = str(experiment_id), parent_run_id
    shots: dict[str, Path] = {}
    with reviewer(screenshot_dir, timeout_ms) as rv:
        with rv.fresh_page() as page:
            default_view = _open_experiment(page, f"{tracking_uri.rstrip('/')}/#/experiments/{eid}", eid)
            shots["default"] = rv.shot(page, "mlflow-default-view.png")

        with rv.fresh_page() as page:
            runs_view = _open_experiment(page, experiment_runs_url(tracking_uri, eid), eid)
            collapsed, expanded = _expand_parent(page, pid)
            _close_assistant(page)
            shots["runs"] = rv.shot(page, "mlflow-pipeline-runs.png")

            page.goto(run_url(tracking_uri, eid, pid))
            children_box = page.locator("[data-testid='key-value-Child runs']")
            children_box.locator("a").first.wait_for()
            child_runs = [t.strip().rstrip(",") for t in children_box.locator("a").all_inner_texts()]
            _close_assistant(page)

            page.get_by_role("tab", name="Artifacts").click()
            page.locator(_ARTIFACT_NODE).first.wait_for()
            artifacts = [n.get_attribute("artifact-name") or n.inner_text().strip() for n in page.locator(_ARTIFACT_NODE).all()]
            node = page.locator(f"{_ARTIFACT_NODE}[artifact-name='{table_artifact}']")
            if node.count():  # top level: clicked, as a person would
                node.click()
            else:  # in a folder (e.g. evaluate/results_table.json): the viewer's own link to it, loaded
                # afresh (a hash change alone does not move the open artifact viewer)
                page.goto(run_url(tracking_uri, eid, pid, artifact=table_artifact))
                page.reload()
            columns, rows = _read_table(page)
            shots["comparison"] = rv.shot(page, "mlflow-pipeline-comparison.png")

            if metrics_run_id and metrics_run_id != pid:
                page.goto(run_url(tracking_uri, eid, metrics_run_id, tab="model-metrics"))
            else:
                page.get_by_role("tab", name="Model metrics").click()
            page.locator(_DRAWN_CHART).first.wait_for()
            charts = [t.strip() for t in page.locator(f"{_DRAWN_CHART} h4").all_inner_texts()]
            shots["metrics"] = rv.shot(page, "mlflow-pipeline-metrics.png")

    return RunReview(default_view, runs_view, collapsed, expanded, child_runs, artifacts, table_artifact, columns, rows,
                     charts, shots, round(time.monotonic() - started, 1))



# ---------------------------------------------------------------- the search page of jobs.serve
@dataclass
class SearchSeen:
    """What the search page showed: image ids in grid order, and the caption list's image ids."""

    unauthorized_status: str  # the status line after a search with a wrong token
    text_results: list[str]
    image_results: list[str]
    image_captions: list[str]
    screenshots: dict[str, Path] = field(default_factory=dict)


def _grid(page) -> list[str]:
    return page.locator("#results .card").evaluate_all("cards => cards.map(c => c.dataset.imageId)")


def search_page(url: str, token: str, text: str, image: Path, screenshot_dir: Path) -> SearchSeen:
    """As a person would: a wrong token first, then the right one; type a caption and search;
    then drop an image file on the drop zone (a real `drop` event carrying the file)."""
    import base64

    with reviewer(screenshot_dir) as rv, rv.fresh_page(1280, 900) as page:
        page.goto(url)
        page.fill("#token", "not-the-token")
        page.fill("#text", text)
        page.click("#search")
        page.locator("#status.error").wait_for()
        refused = page.inner_text("#status")
        page.fill("#token", token)
        page.click("#search")
        page.wait_for_function("document.querySelector('#status').textContent.includes('images (')")
        by_text = _grid(page)
        shots = {"text": rv.shot(page, "search-text.png")}
        page.evaluate("document.querySelector('#status').textContent = ''")
        transfer = page.evaluate_handle(
            """([b64, name]) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type: 'image/png'})); return dt; }""",
            [base64.b64encode(image.read_bytes()).decode(), image.name])
        page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
        page.wait_for_function("document.querySelector('#status').textContent.includes('images (')")
        by_image = _grid(page)
        captions = page.locator("#captions li").evaluate_all("items => items.map(i => i.dataset.imageId)")
        shots["image"] = rv.shot(page, "search-image.png")
    return SearchSeen(refused, by_text, by_image, captions, shots)
