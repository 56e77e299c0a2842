"""The dashboard in a real headless Chromium (Debian's chromium and
chromium-driver, driven by selenium), served by a real `shiftchange
dashboard` process, with a live supervisor, on SQLite and PostgreSQL.

Screenshots of every page land in tests/screenshots/<database>/ (git
ignores it) so a person can look at what the test saw.
"""

import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from harness import wait_for
from supervisor import Queue

pytestmark = pytest.mark.slow
SCREENSHOTS = Path(__file__).parent / "screenshots"
TOKEN = "browser-test-token-0123456789"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("chromium and chromium-driver must be installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def dashboard(tmp_path):
    """Start `shiftchange dashboard` on a database: returns its base URL.
    The token comes from the environment variable, as documented."""
    started = []

    def start(url: str) -> str:
        port = free_port()
        config = tmp_path / "dashboard.yaml"
        config.write_text(yaml.safe_dump({"database": {"url": url}}))
        log = open(tmp_path / "dashboard.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "dashboard", "--config", str(config), "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env={**_env(), "SHIFTCHANGE_DASHBOARD_TOKEN": TOKEN},
        )
        started.append(proc)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(base + "/metrics") or proc.poll() is not None, 20, "the dashboard to listen")
        assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
        return base

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(10)


def _env():
    import os

    return dict(os.environ)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class Page:
    """The browser on one dashboard, with screenshots by name."""

    def __init__(self, driver, base: str, folder: Path):
        self.driver, self.base, self.folder = driver, base, folder
        self.shots = 0

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

        try:
            return self.find(css).text
        except (NoSuchElementException, StaleElementReferenceException):
            return ""

    def click(self, css: str) -> None:
        self.find(css).click()

    def screenshot(self, name: str) -> None:
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        # The window counts the browser's own bars too: leave room for them.
        self.driver.set_window_size(1280, max(700, min(height + 160, 3000)))
        self.shots += 1
        self.driver.save_screenshot(str(self.folder / f"{self.shots:02d}-{name}.png"))
        self.driver.set_window_size(1280, 900)

    def console_errors(self, expected=()) -> list[str]:
        """SEVERE browser log entries, except the error responses we asked for."""
        return [e["message"] for e in self.driver.get_log("browser")
                if e["level"] == "SEVERE" and not any(word in e["message"] for word in expected)]


def test_the_dashboard_in_a_real_browser(e2e_db_url, supervisors, records, browser, dashboard, request):
    kind = request.node.callspec.params["e2e_db_url"]
    folder = SCREENSHOTS / kind
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"screenshots: {folder}")
    sup = supervisors(e2e_db_url, "s1", server={"queues": ["default", "mail"]})
    with Queue(e2e_db_url) as q:
        server = sup.wait_registered(q)
        page = Page(browser, dashboard(e2e_db_url), folder)

        # Sign in with the token.
        page.open("/login")
        page.screenshot("login")
        page.find("input[name=token]").send_keys(TOKEN)
        page.click(".login button")
        wait_for(lambda: browser.current_url == page.base + "/", 10, "the overview after signing in")
        wait_for(lambda: "s1" in page.text("#servers-table"), 10, "the server on the overview")
        page.screenshot("overview")

        # A job finishes while its page is open: the page follows, no reload.
        job = q.enqueue("scjobs:until_file", [str(records), "finish"])
        page.open(f"/jobs/{job.id}")
        browser.execute_script("window.stillTheSamePage = 42")
        wait_for(lambda: "processing" in page.text("[data-live-block=live_state]"), 20, "the job to run")
        page.screenshot("job-running")
        (records / "finish").touch()
        wait_for(lambda: "succeeded" in page.text("[data-live-block=live_state]"), 20, "the page to show success")
        assert browser.execute_script("return window.stillTheSamePage") == 42
        assert (records / f"job-{job.id}.done").exists() and q.get(job.id).state == "succeeded"
        assert "succeeded on s1" in page.text("#timeline")
        page.screenshot("job-succeeded")

        # Pause a queue by its button: storage and the page say so, and its
        # jobs stay enqueued while another queue's run.
        page.open("/")
        page.click('tr[data-queue="mail"] button')
        wait_for(lambda: "paused" in page.text('tr[data-queue="mail"] .queue-status'), 10, "mail shown paused")
        assert q.paused_queues() == {"mail"}
        waiting = q.enqueue("scjobs:quick", [str(records)], queue="mail")
        later = q.enqueue("scjobs:quick", [str(records)])
        wait_for(lambda: q.get(later.id).state == "succeeded", 20, "the default queue's job")
        assert q.get(waiting.id).state == "enqueued"
        wait_for(lambda: "1" in page.text('tr[data-queue="mail"] td:nth-child(2)'), 10, "the waiting job counted")
        page.screenshot("overview-paused")
        page.click('tr[data-queue="mail"] button')
        wait_for(lambda: q.get(waiting.id).state == "succeeded", 20, "the mail job after resuming")
        assert q.paused_queues() == set()

        # Requeue a succeeded job: refused, said plainly; forcing it is its own button.
        page.open(f"/jobs/{job.id}")
        page.click("#job-actions button.primary")
        wait_for(lambda: "succeeded already" in page.text("#error-message"), 10, "the refusal")
        assert q.get(job.id).state == "succeeded"
        page.screenshot("requeue-refused")
        page.click(".error-page button")
        wait_for(lambda: "Requeued 1 job" in page.text(".notice"), 10, "the requeue notice")
        wait_for(lambda: len((records / f"job-{job.id}.runs").read_text().split()) == 2, 20, "the second run")
        assert any(e.kind == "requeued" for e in q.get(job.id).events)
        wait_for(lambda: "requeued" in page.text("#timeline"), 10, "the timeline to show the requeue")

        # Quiet the server from its page, then let it claim again.
        page.open(f"/servers/{server.id}")
        page.click("#server-actions form:first-child button")
        wait_for(lambda: q.server(server.id).quiet, 10, "the server to be quiet")
        wait_for(lambda: "quiet" in page.text("[data-live-block=live_state]"), 10, "the page to show quiet")
        page.screenshot("server-quiet")
        page.click("#server-actions form:first-child button")
        wait_for(lambda: not q.server(server.id).quiet, 10, "the server to claim again")

        # The other pages, for the record.
        for path, name in [("/jobs", "jobs"), ("/jobs?state=succeeded", "jobs-succeeded"), ("/servers", "servers")]:
            page.open(path)
            assert page.find("table.grid")
            page.screenshot(name)
        page.open("/jobs/987654321")
        assert "no job with id 987654321" in page.text("#error-message")
        page.screenshot("not-found")

        assert page.console_errors(expected=("status of 409", "status of 404")) == []
        assert len(list(folder.glob("*.png"))) == page.shots
