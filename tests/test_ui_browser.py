"""The UIs over a finished run, in headless Chromium (issue #8).

``npr ui`` (``dagster dev`` and the MLflow server, on 127.0.0.1, free ports) is started as a command
over the home of the session's ``small`` pipeline run, with the instance config it writes itself (runs
queued and launched by the daemon in subprocesses). Selenium then drives Debian's chromium (``make test``
installs ``chromium`` and ``chromium-driver``):

* the Dagster asset catalog lists every asset of the graph as materialized, by the run that did it
  (``benchmark_scores``: as many partitions as the instance holds, none failed);
* "Materialize" on ``train_problems`` launches a run that reaches Success, in the pipeline's
  ``NPR_HOME`` (the data version it writes is the pipeline's);
* MLflow's experiment page lists the main run's stage runs under its Dagster run, and run pages show the
  lineage tags, walked from ``npr`` down to ``base``.

Then ``npr ui`` is stopped with SIGTERM and nothing it started may be left running.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from _support import free_port

pytestmark = pytest.mark.usefixtures("release_ray")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: Starting the servers (imports of the code location included) on a busy 2-core machine.
START_TIMEOUT_S = 240
#: A page's data to appear.
PAGE_TIMEOUT_S = 120
#: A launched run to finish: queued, launched by the daemon, a fresh process importing the code location.
RUN_TIMEOUT_S = 300
#: The asset "Materialize" is clicked on: unpartitioned, cheap, no Ray.
MATERIALIZE = "train_problems"

# Dagster's catalog: one virtualized row per asset; an asset's status is the row's fourth cell.
CATALOG_ROW = "//div[contains(@class,'VirtualizedTable_row')][.//a[@href='/assets/{}']]"
CATALOG_ROWS = "//div[contains(@class,'VirtualizedTable_row')]//a[starts-with(@href,'/assets/')]"
RUN_LINK = re.compile(r"/runs/([0-9a-f-]{36})")
RUN_STATES = {"Success", "Failure", "Canceled"}


def workspace_location() -> tuple[str, str]:
    """(module, location name) of the code location ``workspace.yaml`` loads (what ``dagster dev`` serves)."""
    (entry,) = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"]
    module = entry["python_module"]
    return module["module_name"], module["location_name"]


def stop_sensor(instance: Any, name: str) -> tuple[str, str]:
    """Record ``name`` as stopped in the instance (before the daemon can tick it); returns its ids.

    ``checkpoint_sensor`` runs by default and, on its first tick over a finished run, requests an
    evaluation of every published checkpoint on every benchmark: minutes of CPU that the UI test does not
    need. Instigator state is keyed by (location, repository, name), so the state recorded here through an
    in-process load of the same module is the one ``dagster dev``'s daemon reads."""
    from dagster._core.remote_origin import InProcessCodeLocationOrigin
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    module, location_name = workspace_location()
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(executable_path=sys.executable, module_name=module, working_directory=str(REPO)),
        location_name=location_name,
    )
    with origin.create_location(instance) as location:
        (repo_name,) = location.get_repository_names()
        sensor = location.get_repository(repo_name).get_sensor(name)
        instance.stop_sensor(sensor.get_remote_origin_id(), sensor.selector_id, sensor)
        return sensor.get_remote_origin_id(), sensor.selector_id


@dataclass
class UIs:
    dagster: str
    mlflow: str
    proc: subprocess.Popen
    log: Path
    started: datetime

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def wait_http(url: str, ui: UIs, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if ui.proc.poll() is not None:
            pytest.fail(f"npr ui exited with {ui.proc.returncode} before {url} answered:\n{ui.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer within {timeout} s:\n{ui.log_tail()}")
        time.sleep(1)


def ignore_sigint() -> None:
    """Start ``npr ui`` as a non-interactive shell starts a background job: SIGINT ignored (inherited by
    its children unless ``npr ui`` resets it; ``dagster dev`` would then ignore SIGTERM too)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_ui(proc: subprocess.Popen) -> list[str]:
    """SIGTERM ``npr ui`` and wait; returns what it had started and left running (killed here)."""
    import psutil

    try:
        started = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs(started, timeout=30)
    left = []
    for p in alive:
        try:
            left.append(f"{p.pid}: {' '.join(p.cmdline())[:160]}")
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.fixture(scope="module")
def uis(small_pipeline, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UIs]:
    """``npr ui`` over the pipeline's home, on free 127.0.0.1 ports; stopped (and checked) afterwards."""
    from npr_pipelines import cli

    config = small_pipeline.dagster_home / "dagster.yaml"
    pipeline_config = config.with_name("dagster.yaml.pipeline")
    # The session's in-process run launcher is for the fixture's instance (already open): ``npr ui``
    # writes its own config when there is none, as on a fresh ``.npr`` (restored afterwards).
    config.rename(pipeline_config)
    log = tmp_path_factory.mktemp("npr-ui") / "npr-ui.log"
    dagster_port, mlflow_port = free_port(), free_port()
    with pytest.MonkeyPatch.context() as mp:
        small_pipeline.environment(mp)  # NPR_HOME, DAGSTER_HOME, NPR_PROFILE=small; nothing foreign
        env = dict(os.environ)
    cmd = [
        sys.executable, "-m", "npr_pipelines.cli", "ui", "--home", str(small_pipeline.home), "--profile", "small",
        "--host", "127.0.0.1", "--dagster-port", str(dagster_port), "--mlflow-port", str(mlflow_port),
    ]  # fmt: skip
    ui, sensor_ids, left = None, None, []
    try:
        sensor_ids = stop_sensor(small_pipeline.instance, "checkpoint_sensor")
        started = datetime.now(UTC)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=ignore_sigint
            )
        ui = UIs(f"http://127.0.0.1:{dagster_port}", f"http://127.0.0.1:{mlflow_port}", proc, log, started)
        wait_http(f"{ui.mlflow}/health", ui, START_TIMEOUT_S)
        wait_http(f"{ui.dagster}/server_info", ui, START_TIMEOUT_S)
        assert config.read_text() == cli.DAGSTER_YAML  # the instance config npr ui writes
        yield ui
    finally:
        if ui is not None:
            left = stop_ui(ui.proc)
        config.unlink(missing_ok=True)
        pipeline_config.rename(config)
        if sensor_ids:
            small_pipeline.instance.delete_instigator_state(*sensor_ids)
    assert not left, f"npr ui left processes running after SIGTERM: {left}\n{ui.log_tail()}"
    assert ui.proc.returncode == 143, ui.log_tail()  # its SIGTERM handler ran the cleanup


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Debian chromium through its chromedriver (no Selenium Manager, no download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: `make test` installs them "
                    "(apt-get install chromium chromium-driver)")  # fmt: skip
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,2000"):
        options.add_argument(arg)
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path_factory.mktemp("chromium") / "driver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, condition: Callable[[Any], Any], what: str, timeout: float = PAGE_TIMEOUT_S) -> Any:
    """``condition``'s first truthy value; on timeout, fail with the page's URL and text."""
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        TimeoutException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5, ignored_exceptions=ignored).until(condition)
    except TimeoutException:
        try:
            text = driver.find_element("tag name", "body").text[:3000]
        except Exception as exc:  # the page itself may be what failed
            text = repr(exc)
        pytest.fail(f"timed out after {timeout} s waiting for {what} on {driver.current_url}:\n{text}")


def open_dagster(driver: Any, ui: UIs, path: str) -> None:
    if not driver.current_url.startswith(ui.dagster):
        driver.get(f"{ui.dagster}/server_info")  # the origin, for its local storage
        # The first visit opens a "join the community" dialog over the page: mark it seen.
        driver.execute_script("window.localStorage.setItem('communityNux', JSON.stringify('1'))")
    driver.get(f"{ui.dagster}{path}")


# -- Dagster -----------------------------------------------------------------------------------------


def catalog_status(driver: Any, asset: str) -> Any:
    """The status cell of ``asset``'s catalog row, once loaded (else None)."""
    from selenium.webdriver.common.by import By

    cells = driver.find_element(By.XPATH, CATALOG_ROW.format(asset)).find_elements(By.XPATH, "./div/div")
    text = cells[3].text.strip() if len(cells) > 3 else ""
    return cells[3] if text and "Loading" not in text else None


def test_asset_catalog_shows_every_asset_materialized(small_pipeline, uis, browser) -> None:
    import dagster as dg
    from selenium.webdriver.common.by import By

    instance = small_pipeline.instance
    graph = small_pipeline.defs.resolve_asset_graph()
    assets = sorted(k.to_user_string() for k in graph.get_all_asset_keys())
    open_dagster(browser, uis, "/assets")
    for asset in assets:
        cell = wait_for(browser, lambda d, a=asset: catalog_status(d, a), f"the catalog status of {asset}")
        node = graph.get(dg.AssetKey(asset))
        if not node.is_partitioned:
            assert cell.text.split("\n")[0] == "Materialized", (asset, cell.text)
            assert cell.find_elements(By.XPATH, ".//*[@aria-label='check_passed']"), asset
            # the timestamp links to the run whose materialization is the latest one in the instance
            link = cell.find_element(By.XPATH, ".//a[contains(@href,'/runs/')]").get_attribute("href")
            assert RUN_LINK.search(link)[1] == small_pipeline.latest_materialization(asset).run_id, asset
            continue
        # partitioned (benchmark_scores): materialized / missing / failed / in progress, then the total
        *counts, total = cell.text.split("\n")
        materialized, missing, failed, in_progress = map(int, counts)
        keys = node.partitions_def.get_partition_keys(dynamic_partitions_store=instance)
        done = instance.get_materialized_partitions(dg.AssetKey(asset))
        assert total == f"{len(keys)} partitions", cell.text
        assert (materialized, failed, in_progress) == (len(done), 0, 0), cell.text
        assert materialized + missing == len(keys), cell.text
        assert materialized >= len(small_pipeline.summary["stages"])  # every stage's final checkpoint
    shown = {
        a.get_attribute("href").rsplit("/assets/", 1)[1]
        for a in browser.find_elements(By.XPATH, CATALOG_ROWS)
    }
    assert shown == set(assets)


def launched_run_id(driver: Any, before: set[str]) -> str | None:
    """The run id of the "Launched run ... View" toast's link (not one of the page's older run links)."""
    from selenium.webdriver.common.by import By

    for link in driver.find_elements(By.XPATH, "//a[normalize-space(.)='View'][contains(@href,'/runs/')]"):
        if (m := RUN_LINK.search(link.get_attribute("href"))) and m[1] not in before:
            return m[1]
    return None


def click_materialize(driver: Any) -> bool:
    """Click the asset page's "Materialize" once it is enabled (it renders disabled first)."""
    from selenium.webdriver.common.by import By

    button = driver.find_element(By.XPATH, "//button[normalize-space(.)='Materialize']")
    if not button.is_enabled():
        return False
    button.click()
    return True


def run_state(driver: Any) -> str | None:
    """The run page's status tag, once the run is finished."""
    from selenium.webdriver.common.by import By

    for tag in driver.find_elements(By.XPATH, "//div[contains(@class,'BaseTag')]"):
        if tag.text.strip() in RUN_STATES:
            return tag.text.strip()
    return None


def test_materialize_from_the_ui_launches_a_run_that_succeeds(small_pipeline, uis, browser) -> None:
    import dagster as dg

    instance = small_pipeline.instance
    version = small_pipeline.data_version(MATERIALIZE)
    old_runs = {r.run_id for r in instance.get_runs()}
    open_dagster(browser, uis, f"/assets/{MATERIALIZE}")
    wait_for(browser, click_materialize, "an enabled Materialize button")
    run_id = wait_for(browser, lambda d: launched_run_id(d, old_runs), "the launched run's toast")
    open_dagster(browser, uis, f"/runs/{run_id}")
    state = wait_for(browser, run_state, f"run {run_id} to finish", timeout=RUN_TIMEOUT_S)
    run = instance.get_run_by_id(run_id)
    assert state == "Success", (state, run.status if run else None, uis.log_tail())
    assert run.status == dg.DagsterRunStatus.SUCCESS
    assert run.asset_selection == {dg.AssetKey(MATERIALIZE)}
    # the run executed in a subprocess against the pipeline's home: it wrote the same data there
    latest = small_pipeline.latest_materialization(MATERIALIZE)
    assert latest.run_id == run_id
    assert small_pipeline.data_version(MATERIALIZE) == version
    path = Path(latest.asset_materialization.metadata["path"].value)
    assert path.is_relative_to(small_pipeline.home), path
    # nothing else ran meanwhile (the daemon launched no sensor or automation run)
    new_runs = instance.get_runs(dg.RunsFilter(created_after=uis.started))
    assert [r.run_id for r in new_runs] == [run_id], [(r.run_id, r.job_name, r.tags) for r in new_runs]


# -- MLflow ------------------------------------------------------------------------------------------


def open_mlflow(driver: Any, ui: UIs, route: str) -> None:
    if not driver.current_url.startswith(ui.mlflow):
        driver.get(f"{ui.mlflow}/health")  # the origin, for its local storage
        # The assistant side panel opens by itself on a first visit: keep it closed.
        driver.execute_script(
            "window.localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
            "window.localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
        )
    driver.get(f"{ui.mlflow}/#{route}")


def displayed_tags(driver: Any) -> dict[str, str]:
    """The run page's tags (key and full value from each tag's title; an empty value shows none)."""
    from selenium.webdriver.common.by import By

    tags = {}
    for tag in driver.find_elements(By.XPATH, "//div[@data-component-type='tag']"):
        titles = [s.get_attribute("title") for s in tag.find_elements(By.XPATH, ".//span[@title]")]
        if titles:
            tags[titles[0]] = titles[1] if len(titles) > 1 else ""
    return tags


def test_mlflow_lists_the_stage_runs_with_their_lineage_tags(small_pipeline, uis, browser) -> None:
    from selenium.webdriver.common.by import By

    from assets.jobs import STAGE_OUTPUTS
    from npr_pipelines.tracking import (
        TAG_DAGSTER_ASSET,
        TAG_DAGSTER_RUN,
        TAG_KIND,
        TAG_PARENT,
        TAG_RUN_KEY,
        TAG_STAGE,
        TAG_UPSTREAM,
        Tracker,
    )

    tracker = Tracker(small_pipeline.tracking_uri)
    experiment = tracker.experiment_id()
    main_run = small_pipeline.latest_materialization("npr_policy").run_id  # the main job's Dagster run
    stage_runs = tracker.client.search_runs(
        [experiment], f"tags.`{TAG_KIND}` = 'stage' and tags.`{TAG_DAGSTER_RUN}` = '{main_run}'"
    )
    names = {r.info.run_id: r.info.run_name for r in stage_runs}
    assert set(STAGE_OUTPUTS) <= set(names.values()), names  # every stage, plus rejection sampling
    (parent,) = {r.data.tags[TAG_PARENT] for r in stage_runs}  # nested under the Dagster run's MLflow run

    # the experiment's runs table: the Dagster run's row, expanded, lists the stage runs
    open_mlflow(browser, uis, f"/experiments/{experiment}/runs?workflowType=machine_learning")
    row = "//div[@role='row'][@row-id='{}']"
    expander = row.format(parent) + "//button[contains(@data-component-id,'runnamecellrenderer')]"
    wait_for(browser, lambda d: d.find_element(By.XPATH, expander), f"the row of MLflow run {parent}").click()
    for run_id, name in names.items():
        shown = wait_for(browser, lambda d, r=run_id: d.find_element(By.XPATH, row.format(r)).text,
                         f"the row of stage run {name} ({run_id})")  # fmt: skip
        assert name in shown.split("\n"), (name, shown)

    # run pages: the lineage tags, from npr down to base, each matching the store and Dagster
    npr_run = next(r for r, n in names.items() if n == "npr")
    wait_for(browser, lambda d: d.find_element(By.XPATH, row.format(npr_run) + f"//a[contains(@href,'{npr_run}')]"),
             "the npr run's link").click()  # fmt: skip
    lineage = (TAG_STAGE, TAG_DAGSTER_ASSET, TAG_DAGSTER_RUN, TAG_RUN_KEY, TAG_UPSTREAM)
    chain, run_id = [], npr_run
    while run_id:
        stored = tracker.client.get_run(run_id).data.tags
        expected = {k: stored.get(k, "") for k in lineage}
        if chain:  # the first page is the one the runs table's link opened
            open_mlflow(browser, uis, f"/experiments/{experiment}/runs/{run_id}")
        wait_for(browser, lambda d, e=expected: {k: displayed_tags(d).get(k, "") for k in lineage} == e,
                 f"run {run_id}'s lineage tags {expected}")  # fmt: skip
        asset = expected[TAG_DAGSTER_ASSET]
        assert expected[TAG_DAGSTER_RUN] == small_pipeline.latest_materialization(asset).run_id, asset
        chain.append(asset)
        upstream = [u for u in expected[TAG_UPSTREAM].split(",") if u]
        assert len(upstream) <= 1, upstream
        run_id = upstream[0] if upstream else None
    assert chain == ["npr_policy", "npr_beta_checkpoint", "base_model"]
