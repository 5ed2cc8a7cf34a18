"""Screenshot of the search page with results (docs/web.png), taken from a real `imsearch serve` in headless Chromium.

usage: .venv/bin/python scripts/web_screenshot.py [--photos DIR] [--query FILE] [--out docs/web.png] [--phone FILE]

Stores the photos in the embedded database under IMSEARCH_HOME (a temporary one when unset, removed at the end;
a kept one makes a second run quick: unchanged photos are skipped), serves it on a free port,
uploads the query, prints the matches in each mode, and saves the page in the same-class mode. Without
IMSEARCH_WEIGHTS it uses stand-in weights (../shared/tools/make_test_weights.py): the matches then mean nothing.
Needs Debian's chromium at /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("IMSEARCH_SHARED", ROOT.parent / "shared"))
IMSEARCH = [sys.executable, "-c", "from imsearch.cli import main; main()"]

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--photos", type=Path, default=SHARED / "datasets/rooms/base", help="folder to store")
parser.add_argument("--query", type=Path, default=SHARED / "datasets/rooms/test/kitchen/kitchen_001.jpg",
                    help="photo to upload (not in --photos)")
parser.add_argument("--out", type=Path, default=ROOT / "docs/web.png", help="where the screenshot goes")
parser.add_argument("--phone", type=Path, help="also save the page at phone size (390 px wide) here")
args = parser.parse_args()

# 1. A home for the embedded database, and weights.
keep = bool(os.environ.get("IMSEARCH_HOME"))
home = Path(os.environ["IMSEARCH_HOME"]) if keep else Path(tempfile.mkdtemp(prefix="imsearch-screenshot-"))
home.mkdir(parents=True, exist_ok=True)
env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | {"IMSEARCH_HOME": str(home)}
if not env.get("IMSEARCH_WEIGHTS"):
    env["IMSEARCH_WEIGHTS"] = str(home / "standin.pth")
    if not Path(env["IMSEARCH_WEIGHTS"]).exists():
        subprocess.run([sys.executable, str(SHARED / "tools/make_test_weights.py"), env["IMSEARCH_WEIGHTS"]],
                       check=True, capture_output=True)
    print("stand-in weights: the matches below mean nothing")

server = None
try:
    # 2. Store the photos.
    ingest = subprocess.run([*IMSEARCH, "ingest", str(args.photos)], env=env, check=True, capture_output=True,
                            text=True)
    print("$ imsearch ingest", args.photos, "\n" + ingest.stdout.strip())

    # 3. Serve them on a free port.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([*IMSEARCH, "serve", "--port", str(port)], env=env)
    for _ in range(600):
        try:
            if httpx.get(base + "/api/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    print("$ imsearch serve --port", port)

    def settle(page: Page) -> None:
        """Until the newest search has shown its thumbnails."""
        while not page.evaluate("""() => !document.querySelector('[aria-busy]')
                && !document.getElementById('results').hidden
                && [...document.querySelectorAll('#matches img')].every(i => i.complete && i.naturalWidth > 0)"""):
            time.sleep(0.1)

    # 4. Upload the query, show each mode, keep the page in the same-class mode.
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        shots = [(args.out, {"width": 1200, "height": 900}, 1)]
        if args.phone:
            shots.append((args.phone, {"width": 390, "height": 844}, 2))
        for out, viewport, scale in shots:
            page = browser.new_page(viewport=viewport, device_scale_factor=scale)
            page.goto(base + "/")
            page.set_input_files("#file", str(args.query))
            for mode in ("all", "other", "same"):
                page.check(f'input[name="mode"][value="{mode}"]')
                settle(page)
                classes = page.locator("#matches .cls").all_inner_texts()
                print(f"{mode:>5}: {len(classes)} matches, classes {', '.join(classes)}; "
                      f"{page.inner_text('#timing')}")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            print("screenshot:", out)
        browser.close()
finally:
    if server is not None:
        server.terminate()
        server.wait(timeout=30)
    if not keep:
        shutil.rmtree(home, ignore_errors=True)
