"""The fleet page in a real browser (headless Chromium driven by selenium): it lists the
live workers and updates within 2 s when one leaves."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from meshserve.etcd_process import EtcdProcess
from tests.mesh import Mesh, running_mesh

pytestmark = pytest.mark.e2e

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    if CHROMIUM is None or DRIVER is None:
        pytest.fail("needs Debian's chromium and chromium-driver (make test installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # No network beyond localhost here: without these, Chromium retries Google's hosts.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,600",
                 f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
async def mesh(etcd: EtcdProcess, models_dir: Path) -> AsyncIterator[Mesh]:
    async with running_mesh(etcd.endpoint, models_dir, workers=0, models=(), metrics_port=0) as m:
        for wid in ("w1", "w2"):
            await m.add_worker(wid, [], fake_models=["fake-gen"])
        await m.wait_fleet("fake-gen", 2)
        yield m


# The page replaces its rows every second: read them in one script run (atomic in the
# page), not element by element (an element can be replaced between two reads).
_ROWS = "return [...document.querySelectorAll('#workers tr')].map(r => r.dataset.worker)"
_SHARES = (
    "return [...document.querySelectorAll('#workers tr td:nth-child(9)')].map(td => td.textContent)"
)


def _rows(driver: webdriver.Chrome) -> set[str]:
    return {str(w) for w in driver.execute_script(_ROWS)}


async def _until(driver: webdriver.Chrome, want: set[str], timeout_s: float) -> float:
    """Seconds until the rendered rows are `want` (the page is polled in the browser)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if await asyncio.to_thread(_rows, driver) == want:
            return time.monotonic() - start
        await asyncio.sleep(0.05)  # reading the DOM of another process: nothing to await
    raise AssertionError(f"page shows {_rows(driver)}, not {want}, after {timeout_s}s")


def _shares(driver: webdriver.Chrome) -> list[int]:
    cells = [str(t) for t in driver.execute_script(_SHARES)]
    return [int(t.rstrip("%")) for t in cells if t.endswith("%")]


async def _until_shares(driver: webdriver.Chrome, timeout_s: float) -> list[int]:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        shares = await asyncio.to_thread(_shares, driver)
        if sum(shares) > 0:
            return shares
        await asyncio.sleep(0.05)
    raise AssertionError("the page never showed any traffic share")


@pytest.mark.timeout(120)
async def test_fleet_page_lists_workers_and_follows_a_departure(
    mesh: Mesh, browser: webdriver.Chrome
) -> None:
    url = f"http://127.0.0.1:{mesh.gateway.metrics_port}/"
    await asyncio.to_thread(browser.get, url)
    await _until(browser, {"w1", "w2"}, 10)
    text = await asyncio.to_thread(
        browser.execute_script, "return document.getElementById('workers').innerText"
    )
    assert "fake-gen: ready" in text and "cpu" in text
    status = await asyncio.to_thread(
        browser.execute_script, "return document.getElementById('status').textContent"
    )
    assert status.startswith("serving")
    for _ in range(8):
        _ = [m async for m in mesh.client.generate("fake-gen", "hi", max_tokens=4, timeout=10)]
    shares = await _until_shares(browser, 5)
    assert sum(shares) == pytest.approx(100, abs=2)  # every attempt went to one of them
    shot = os.environ.get("MESHSERVE_FLEET_SCREENSHOT")
    if shot:  # docs/img/fleet.png is made this way
        await asyncio.to_thread(browser.save_screenshot, shot)
    await mesh.workers.pop("w2").stop()  # leaves etcd: the view drops it
    elapsed = await _until(browser, {"w1"}, 5)
    assert elapsed < 2.0, f"the page took {elapsed:.2f}s to show the departure"
