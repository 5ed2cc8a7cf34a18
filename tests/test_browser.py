"""The page end to end: `imsearch serve` in a subprocess, driven by a real headless Chromium through Playwright.

Needs Debian's chromium at /usr/bin/chromium (`./scripts/test` installs it when run as root). Without it these
tests are skipped with that reason, and fail when CI is set: CI never skips them silently.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import CLASSES, ROOMS, copy_photos, with_database
from tests.test_web import huge_png

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PER_CLASS = 5


def unseen(cls: str = "kitchen", i: int = 0) -> Path:
    """A room photo from the shared test split: never stored."""
    return sorted((ROOMS / "test" / cls).glob("*.jpg"))[i]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        reason = (f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install -y chromium), "
                  "which ./scripts/test does when run as root")
        if in_ci():
            pytest.fail(reason + "; CI must run the browser tests")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(browser, server_url, weights, tmp_path_factory):
    """`imsearch serve` on a free port over a database of 5 shared base photos per class; its base URL."""
    from imsearch import Imsearch

    name = f"imsearch_test_browser_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_database(server_url, name)
    folder = tmp_path_factory.mktemp("browser")
    with Imsearch(url, weights=weights, device="cpu") as app:
        assert app.ingest(copy_photos(folder / "photos", PER_CLASS)).added == 5 * PER_CLASS
    port = free_port()
    log = open(folder / "serve.log", "w+b")  # noqa: SIM115 - closed below, after the server stops
    proc = subprocess.Popen(
        [sys.executable, "-c", "from imsearch.cli import main; main()", "--database-url", url, "serve",
         "--port", str(port), "--weights", weights, "--device", "cpu"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"imsearch serve exited with {proc.returncode}: {log.read().decode()[-2000:]}")
            try:
                if httpx.get(base + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("imsearch serve did not answer within 120 s")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    p.set_default_timeout(60_000)
    p.goto(server + "/")
    wait_until(p, "() => document.querySelectorAll('#class option').length === 5")
    yield p
    context.close()


def wait_until(page, script: str, arg: object = None, timeout: float = 60) -> None:
    """Poll a JS predicate from here: the page's policy forbids the eval that `page.wait_for_function` uses."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(script, arg):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {script}")
        time.sleep(0.1)


def wait_for_matches(page, n: int = 5) -> None:
    """Until n thumbnails have loaded and the rank table has n rows."""
    wait_until(
        page,
        """n => {
            const imgs = [...document.querySelectorAll('#matches img')];
            return !document.getElementById('results').hidden && !document.querySelector('[aria-busy]')
                && imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0)
                && document.querySelectorAll('#ranks tbody tr').length === n;
        }""",
        n,
    )


def match_classes(page) -> list[str]:
    return page.locator("#matches .cls").all_inner_texts()


def test_upload_shows_five_thumbnails_then_each_mode_chosen_by_keyboard(page):
    page.set_input_files("#file", str(unseen()))
    wait_for_matches(page)
    assert page.locator("#matches li").count() == 5
    assert page.eval_on_selector("#query-img", "i => i.complete && i.naturalWidth > 0")
    assert re.fullmatch(r"5 matches in \d+\.\d{3} s \(model \d+\.\d{3} s, database \d+\.\d{3} s\)",
                        page.inner_text("#timing"))
    rows = page.locator("#ranks tbody tr")
    assert rows.nth(0).locator("td").all_inner_texts()[:2] == ["1", unseen().name]
    assert set(match_classes(page)) <= set(CLASSES)
    assert page.locator("#class-field").is_hidden()

    page.focus('input[name="mode"][value="all"]')
    page.keyboard.press("ArrowRight")  # radio group: the next mode, same class
    page.wait_for_selector("#class-note:not([hidden])")
    wait_for_matches(page)
    suggested = page.input_value("#class")
    assert "top match" in page.inner_text("#class-note")
    assert match_classes(page) == [suggested] * 5

    page.keyboard.press("ArrowRight")  # other classes
    wait_until(page, "() => document.getElementById('class-note').textContent.includes('every other class')")
    wait_for_matches(page)
    assert len(match_classes(page)) == 5 and suggested not in match_classes(page)

    chosen = next(c for c in CLASSES if c != suggested)
    page.focus("#class")
    page.select_option("#class", chosen)
    wait_until(page, "() => document.getElementById('class-note').textContent.includes('you chose')")
    wait_for_matches(page)
    assert chosen not in match_classes(page)


def test_bad_files_show_a_one_line_error_and_the_next_photo_still_works(page):
    for name, mime, data, message in [
        ("notes.txt", "text/plain", b"not a photo\n", "notes.txt: not an image (unknown or unsupported format)"),
        ("empty.jpg", "image/jpeg", b"", "empty.jpg: empty file (0 bytes)"),
        ("bomb.png", "image/png", huge_png(), "bomb.png: too many pixels"),
    ]:
        page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])
        page.wait_for_selector("#error:not([hidden])")
        assert page.inner_text("#error").startswith(message) and "\n" not in page.inner_text("#error")
        assert page.locator("#results").is_hidden()

        page.set_input_files("#file", str(unseen("bathroom")))
        wait_for_matches(page)
        assert page.locator("#error").is_hidden()


def test_a_dropped_photo_is_searched(page):
    data = base64.b64encode(unseen("living_room").read_bytes()).decode()
    page.evaluate(
        """data => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], 'dropped.jpg', {type: 'image/jpeg'}));
            document.getElementById('drop').dispatchEvent(
                new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""",
        data,
    )
    wait_for_matches(page)
    assert page.inner_text("#query-name") == "dropped.jpg"


def test_phone_screen_shows_results_without_sideways_scrolling_or_outside_requests(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                  has_touch=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(server + "/")
    wait_until(page, "() => document.querySelectorAll('#class option').length === 5")
    page.set_input_files("#file", str(unseen("dining_room")))
    wait_for_matches(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    widths = page.eval_on_selector_all("#matches img", "imgs => imgs.map(i => i.getBoundingClientRect().width)")
    assert all(100 < w < 390 for w in widths)
    assert requested and all(u.startswith((server + "/", "blob:", "data:")) for u in requested), requested
    context.close()
