"""The Dagster UI in a real browser, the way `make ui` serves it: the code location loads, the
global lineage draws every asset group, and the automation page lists every sensor.

Runs `dagster dev` on a free port with its own state folders, and headless Debian Chromium
through Selenium. Screenshots land in $EVENTML_TEST_ARTIFACTS (default tests/e2e/artifacts/,
git-ignored) together with the server's log.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("EVENTML_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))
STARTUP_S = 90  # loading the code location imports torch, xgboost and mlflow: slow on 2 busy cores

LOCATIONS = """{ workspaceOrError { __typename ... on Workspace { locationEntries {
    name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


@pytest.fixture(scope="module")
def expected() -> dict[str, list[str]]:
    """What the UI must show, read off the code location itself so new groups and sensors count."""
    from ml_assets.definitions import defs

    groups = {node.group_name for node in defs.resolve_asset_graph().asset_nodes}
    return {"groups": sorted(groups), "sensors": sorted(s.name for s in defs.sensors or [])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _locations(url: str) -> list[dict] | None:
    """The code locations the webserver knows, or None while it does not answer yet."""
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": LOCATIONS}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body = json.load(response)
    except OSError:
        return None
    return body["data"]["workspaceOrError"].get("locationEntries")


def _stop(process: subprocess.Popen) -> None:
    """`dagster dev` and its children (webserver, daemon, code servers) share its process group;
    it ignores SIGTERM for many seconds, so SIGTERM the group, wait a little, then SIGKILL it."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGKILL:
            return


@pytest.fixture(scope="module")
def webserver(tmp_path_factory):
    """`make ui`: `dagster dev` on the workspace the set-up step writes, with a private
    EVENTML_HOME and DAGSTER_HOME; its URL once the code location, named after the pack, has
    loaded."""
    home = tmp_path_factory.mktemp("ui-home")
    env = {**os.environ, "EVENTML_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    # What `make ui` runs first: the set-up step that creates every store once.
    subprocess.run([sys.executable, "-m", "resources.state"], cwd=REPO, env=env, check=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log_path = ARTIFACTS / "dagster-dev.log"
    dagster = Path(sys.executable).parent / "dagster"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(dagster), "dev", "-w", str(home / "dagster" / "workspace.yaml"),
             "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            entries = _locations(url)
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"dagster dev did not come up within {STARTUP_S}s:\n{tail}")
            time.sleep(1)
        errors = [e for e in entries if e["locationOrLoadError"]["__typename"] == "PythonError"]
        assert not errors, f"code location failed to load: {errors}"
        assert [e["name"] for e in entries] == ["lending_sim"]  # the deployment's pack
        yield url
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.skip(f"no {' or '.join(missing)}: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-quic", "--window-size=1600,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, what: str, timeout: float = 45):
    try:
        # React re-renders replace the elements a condition is reading: try again, not fail.
        return WebDriverWait(
            driver, timeout, poll_frequency=0.5, ignored_exceptions=[StaleElementReferenceException]
        ).until(condition)
    except TimeoutException:
        driver.save_screenshot(str(ARTIFACTS / "timeout.png"))
        body = driver.find_element(By.TAG_NAME, "body").text
        pytest.fail(f"timed out waiting for {what} at {driver.current_url}; page shows:\n{body}")


def _dismiss_community_dialog(driver) -> None:
    """The first visit opens a "Join the Dagster community" dialog over the page; skip it."""
    skip = "//button[normalize-space()='Skip']"
    try:
        WebDriverWait(driver, 5).until(lambda d: d.find_elements(By.XPATH, skip))
    except TimeoutException:
        return
    driver.find_element(By.XPATH, skip).click()
    _wait(driver, lambda d: not d.find_elements(By.XPATH, skip), "the dialog to close", 10)


def _graph_groups(driver) -> set[str]:
    """Names on the lineage graph's group boxes (drawn as HTML inside the SVG, not the sidebar)."""
    return {
        line.strip()
        for node in driver.find_elements(By.CSS_SELECTOR, "svg foreignObject")
        for line in node.text.splitlines()
    }


def _page_lines(driver) -> set[str]:
    return {line.strip() for line in driver.find_element(By.TAG_NAME, "body").text.splitlines()}


# `browser` first: without Chromium the test skips before starting a server.
def test_the_lineage_shows_every_group_and_automation_lists_every_sensor(
    browser, webserver, expected
):
    groups, sensors = set(expected["groups"]), set(expected["sensors"])
    assert groups and sensors  # the code location has both; an empty set would prove nothing

    browser.get(f"{webserver}/asset-groups")
    _wait(
        browser, lambda d: groups <= _graph_groups(d), f"asset groups {sorted(groups)} in the graph"
    )
    _dismiss_community_dialog(browser)
    _wait(browser, lambda d: "Global asset lineage" in _page_lines(d), "the page title")
    browser.save_screenshot(str(ARTIFACTS / "asset-groups.png"))

    browser.get(f"{webserver}/automation")
    _wait(browser, lambda d: sensors <= _page_lines(d), f"sensors {sorted(sensors)}")
    _dismiss_community_dialog(browser)
    browser.save_screenshot(str(ARTIFACTS / "automation.png"))
