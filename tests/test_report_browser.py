"""A real browser opens the report from disk: circuitsvis components mount, figures decode, and
the page attempts no network request (every http/https/ws request is blocked and counted).

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them) and selenium ([dev]).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium not installed (apt-get install -y chromium chromium-driver)",
)

LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome:", "devtools:")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """The demo's report on factworld (built once: ~15 s)."""
    from kvmem.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--quiet", "--samples", "2", "--steps", "4", "--n-tokens", "4000",
                 "--cache-dir", str(out / "cache")]) == 0
    return out / "report.html"


@pytest.fixture(scope="module")
def driver():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-dev-shm-usage", "--disable-extensions", "--no-first-run",
              "--disable-component-update", "--disable-sync", "--disable-default-apps"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


def _network_events(drv) -> list[dict]:
    events = []
    for entry in drv.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method", "").startswith("Network."):
            events.append(msg)
    return events


def test_report_opens_offline_and_mounts(report, driver):
    # Block the network at the browser level and count what the page tries to fetch.
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["http://*", "https://*", "ws://*", "wss://*"]})
    # CSP violations (a fetch the page's own policy stopped) are counted by the page itself.
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
        "window.__kvmemCsp = [];"
        "document.addEventListener('securitypolicyviolation', e => window.__kvmemCsp.push(e.blockedURI));"
    )})
    driver.get_log("performance")  # drop events from before the page
    driver.get(report.as_uri())

    # circuitsvis renders with React after the module scripts run: wait for every container to fill.
    deadline = time.time() + 30
    while True:
        state = driver.execute_script(
            "const c = [...document.querySelectorAll('div[id^=\"circuits-vis-\"]')];"
            "return {n: c.length, mounted: c.filter(d => d.childElementCount > 0).length,"
            " ready: document.readyState};"
        )
        if state["ready"] == "complete" and state["n"] and state["mounted"] == state["n"]:
            break
        if time.time() > deadline:
            logs = driver.get_log("browser")
            pytest.fail(f"circuitsvis components did not mount: {state}; console: {logs[:5]}")
        time.sleep(0.2)
    assert state["n"] >= 2  # the trace view and the knowledge-neuron view

    # Mounted means real content: the trace view has its token spans and selectors.
    text = driver.execute_script(
        "return [...document.querySelectorAll('div[id^=\"circuits-vis-\"]')].map(d => d.innerText.length);"
    )
    assert all(n > 0 for n in text), text

    figures = driver.execute_script(
        "return [...document.querySelectorAll('figure img')].map(i => "
        "({src: i.src.slice(0, 22), w: i.naturalWidth, h: i.naturalHeight, done: i.complete}));"
    )
    assert len(figures) >= 4
    for f in figures:
        assert f["src"] == "data:image/png;base64,"
        assert f["done"] and f["w"] > 100 and f["h"] > 50, f

    headings = driver.execute_script("return [...document.querySelectorAll('h2')].map(h => h.innerText);")
    assert len(headings) == 4

    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

    events = _network_events(driver)
    remote = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"
              and not e["params"]["request"]["url"].startswith(LOCAL_SCHEMES)]
    blocked = [e for e in events if e["method"] == "Network.loadingFailed" and e["params"].get("blockedReason")]
    csp = driver.execute_script("return window.__kvmemCsp;")
    assert remote == [], f"the report tried to fetch: {remote}"
    assert blocked == [], blocked
    assert csp == [], f"the report's policy blocked: {csp}"
    # the performance log does see requests: the page itself was loaded from disk
    loaded = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    assert any(u.startswith("file:") for u in loaded), loaded[:5]
