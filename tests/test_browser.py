"""The search page in a real browser: `hvs serve` in a subprocess on a loopback port, Debian's
chromium driven headless by Playwright (no browser download), a query image uploaded through the
file input, thumbnails and scores checked. Set HVS_SCREENSHOT=path.png to keep a screenshot."""

import io
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from conftest import build_tiny_world

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not os.path.exists(CHROMIUM):
    pytest.skip(
        f"{CHROMIUM} not found: install Debian's chromium (scripts/system_deps.sh) to run the browser test",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
httpx = pytest.importorskip("httpx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("browser")
    data = build_tiny_world(root)
    query = root / "query.png"
    buf = io.BytesIO()
    Image.fromarray(data.query.images[0, 0].numpy(), mode="L").resize((96, 96), Image.NEAREST).save(buf, "PNG")
    query.write_bytes(buf.getvalue())

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "HVS_TOKEN"}
    log = open(root / "server.log", "w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hvs",
            "serve",
            "--index",
            f"faiss:{root / 'idx'}",
            "--query-model",
            str(root / "q"),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"hvs serve exited with {proc.returncode}: {log.read()[-2000:]}")
            try:
                if httpx.get(url + "healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("hvs serve did not answer /healthz within 90 s")
            time.sleep(0.2)
        yield url, query
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_upload_shows_thumbnails_and_scores(server):
    url, query = server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url)
            page.wait_for_function("document.getElementById('info').textContent.includes('gallery items')")
            page.set_input_files("#file", str(query))
            page.wait_for_selector("#results .result img", timeout=30_000)
            # every thumbnail actually loaded from /thumb/{id}
            page.wait_for_function(
                "Array.from(document.querySelectorAll('#results img')).every(i => i.complete && i.naturalWidth > 0)",
                timeout=30_000,
            )
            assert page.locator("#results .result").count() == 10  # default k
            scores = [float(s) for s in page.locator("#results .score").all_inner_texts()]
            assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
            labels = page.locator("#results .label").all_inner_texts()
            assert all(re.fullmatch(r"pattern-\d+", label) for label in labels)
            assert "of 18 gallery items" in page.locator("#status").inner_text()
            if os.environ.get("HVS_SCREENSHOT"):
                page.screenshot(path=os.environ["HVS_SCREENSHOT"], full_page=True)
            # an invalid file shows a one-line error instead of results
            bad = query.with_name("bad.png")
            bad.write_bytes(b"not an image")
            page.set_input_files("#file", str(bad))
            page.wait_for_function("document.getElementById('status').classList.contains('error')")
            assert "400" in page.locator("#status").inner_text()
            assert page.locator("#results .result").count() == 0
        finally:
            browser.close()
