"""The merchant preview page at ``/`` (serve/static/): served by the ingress, and driven in a browser.

The fast test asks the FastAPI app itself (no Ray): ``/`` and its assets are plain routes on the app.
The slow one starts a real embedded cluster (tiny preset, auth on, as ``tests/test_serve.py`` does),
opens the page in headless Chromium, types a key and a brief, and checks that the MSE player plays
the streamed fMP4 while the video is still being generated, that the job list shows the finished
video with its quality report, and that the browser logged no errors.

The browser is driven with Selenium through Debian's ``chromium`` and ``chromedriver`` packages
(``scripts/setup.sh`` installs them): Selenium's pip wheel is pure Python and talks to the system
chromedriver given as a ``Service`` path with Selenium Manager off (``SE_OFFLINE``), so nothing is
downloaded. Playwright's Python package would want its own browser build (a download) or a pinned
Chromium version matching its protocol; Debian's chromedriver always matches Debian's chromium. Where
either is missing, or Selenium is not installed, the browser test skips saying which.

``SHOPREEL_ARTIFACTS=DIR`` keeps a screenshot of the page as ``DIR/preview_page.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT_IMAGE = ROOT / "examples" / "sneaker.png"
API_KEY: dict[str, str] = {}


# --- fast: the page and its assets, from the app object ------------------------------------------


def test_the_page_and_its_assets_are_served_without_a_key():
    from fastapi.testclient import TestClient

    from shopreel.serve.app import PREVIEW_FILES, api

    with TestClient(api) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<video" in page.text and "noise-like" in page.text  # the tiny preset's frames are noise
        linked = re.findall(r'(?:src|href)="/static/([^"]+)"', page.text)
        assert sorted(linked) == ["preview.css", "preview.js"]
        for name in linked:
            asset = client.get(f"/static/{name}")
            assert asset.status_code == 200 and asset.content, name
            assert asset.headers["content-type"].split(";")[0] == PREVIEW_FILES[name].split(";")[0]
        assert "MediaSource" in client.get("/static/preview.js").text
        # Only the named files: no other file of the package, no path tricks; OpenAI's error body.
        for path in ("/static/app.py", "/static/..%2Fapp.py", "/static/"):
            missing = client.get(path)
            assert missing.status_code == 404 and "message" in missing.json()["error"], path
        # The page is not part of the API's schema (which CI fuzzes and counts).
        paths = client.get("/openapi.json").json()["paths"]
        assert "/" not in paths and not any(path.startswith("/static") for path in paths)


def test_a_non_editable_install_ships_the_page():
    """pyproject's package-data names the static folder, and every served file is in it."""
    import tomllib

    from shopreel.serve.app import PREVIEW_DIR, PREVIEW_FILES

    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "static/*" in package_data["shopreel.serve"]
    assert PREVIEW_DIR == ROOT / "serve" / "static"
    assert sorted(path.name for path in PREVIEW_DIR.glob("*")) == sorted(PREVIEW_FILES)


# --- slow: a browser against a real cluster ------------------------------------------------------


def _browser_paths() -> tuple[str, str]:
    """Debian's chromium and chromedriver, or a skip naming what is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver; "
            "scripts/setup.sh does it as root)"
        )
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    assert chromium is not None and driver is not None
    return chromium, driver


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _browser_paths()  # skip before starting a cluster for nothing
    from net import free_port

    from shopreel.serve.auth import new_key
    from shopreel.serve.runner import load_config, start
    from shopreel.serve.store_url import open_job_store

    data_dir = tmp_path_factory.mktemp("preview-data")
    config = load_config(None, **{"jobs.data_dir": str(data_dir), "auth.enabled": True})
    with open_job_store(config.jobs.store_url()) as jobs:
        created = new_key("acme", "user")
        jobs.create_key(created.record, created.secret_sha256)
        API_KEY["acme"] = created.secret
    running = start(config, port=free_port(), ready_timeout_s=300)
    yield running
    running.stop()


@pytest.fixture
def browser():
    chromium, driver_path = _browser_paths()
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=1280,1600",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    yield driver
    driver.quit()


def _wait(condition, timeout_s: float, what: str, poll_s: float = 0.2):
    """``condition()``'s first truthy result; an element the page re-rendered meanwhile (the job list
    refreshes itself) counts as not yet."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = condition()
        except StaleElementReferenceException:
            result = None
        if result:
            return result
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _severe(entries: list[dict]) -> list[str]:
    return [entry["message"] for entry in entries if entry["level"] == "SEVERE"]


def _fill(driver, element_id: str, text: str) -> None:
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(text)


@pytest.mark.slow
@pytest.mark.serve
def test_the_page_plays_the_stream_while_the_video_is_still_generated(server, browser, tmp_path):
    import httpx

    driver = browser
    # 1. Open the page without a key: auth is on, so the API's 401 shows in the page.
    driver.get(f"{server.url}/")
    errors = driver.find_element("id", "errors")
    _wait(lambda: errors.is_displayed() and "API key" in errors.text, 30, "the 401 shown in the page")
    assert "401" in errors.text
    unauthorised = _severe(driver.get_log("browser"))
    assert unauthorised and all("401" in message for message in unauthorised), unauthorised

    # 2. Type the key (kept in localStorage): the errors go and the model's defaults show.
    _fill(driver, "api-key", API_KEY["acme"])
    driver.find_element("id", "title").click()  # leave the field: its change event fires
    _wait(lambda: "shopreel-tiny" in driver.find_element("id", "model-info").text, 30, "the model list")
    assert not errors.is_displayed()
    assert driver.execute_script("return localStorage.getItem('shopreel.apiKey')") == API_KEY["acme"]
    assert driver.find_element("id", "size").get_attribute("placeholder") == "128x128"

    # 3. A brief of six shots with more denoising steps than the preset's: generation takes several
    #    seconds, so a player that waited for the whole video could not be playing before it ended.
    _fill(driver, "title", "Thermo Mug")
    _fill(driver, "category", "drinkware")
    _fill(
        driver,
        "selling-points",
        "Keeps coffee hot for 6 hours\nLeak-proof lid\nFits car cup holders\nDishwasher safe",
    )
    _fill(driver, "price", "89.00")
    _fill(driver, "duration", "8")
    _fill(driver, "fps", "8")
    _fill(driver, "inference-steps", "32")
    driver.find_element("id", "images").send_keys(str(PRODUCT_IMAGE))
    _fill(driver, "campaign-name", "11.11")
    _fill(driver, "campaign-badge", "双11")
    _fill(driver, "profile-interests", "coffee, commute")
    driver.find_element("id", "submit").click()

    # 4. The stream ends (the reader is done and the MediaSource ended).
    state = _wait(
        lambda: driver.execute_script(
            "const s = window.shopreelPreview; return (s.endedOfStream || s.errors.length) ? s : null"
        ),
        240,
        "the stream to end",
    )
    assert state["errors"] == [], state["errors"]
    print(f"\nstream codecs: {state['mime']}; {state['bytes']} bytes in {state['chunks']} chunks")
    assert state["codecs"][0].startswith("avc1.") and state["mime"].startswith("video/mp4")

    # (a) Playing before generation ended: the <video> fired `playing` and its clock moved past 0
    # before the fetch reader got the stream's last byte, and before the generator had denoised the
    # last shot (server clock, same machine as the browser).
    assert state["playingAt"] is not None and state["advancedAt"] is not None, state
    assert state["playingAt"] < state["streamDoneAt"], state
    assert state["advancedAt"] < state["streamDoneAt"] and state["currentTimeAtStreamDone"] > 0, state
    video_id = state["videoId"]
    with httpx.Client(
        base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY['acme']}"}
    ) as http:
        record = _wait(
            lambda: (r := http.get(f"/v1/videos/{video_id}").json())["status"] == "completed" and r,
            60,
            "the job record to complete",
        )
    timings = record["shopreel"]["timings"]
    print(
        f"playing at {state['playingWallMs'] / 1000:.3f}, last shot denoised at "
        f"{timings['last_shot_denoised_at']:.3f}, stream done at {state['streamDoneWallMs'] / 1000:.3f} "
        f"({state['streamDoneAt'] - state['playingAt']:.0f} ms of playing before the stream ended)"
    )
    assert state["playingWallMs"] / 1000 < timings["last_shot_denoised_at"], (state, timings)
    duration = driver.execute_script("return document.getElementById('player').duration")
    assert duration == pytest.approx(record["shopreel"]["num_frames"] / 8, abs=0.2)

    # (b) The finished video in the job list: completed, its quality report, its thumbnail loaded.
    row_css = f"tr[data-video-id='{video_id}'][data-status='completed']"

    def completed_row() -> dict | None:  # read in one go: the list may re-render the row between reads
        rows = driver.find_elements("css selector", row_css)
        if not rows or "SSIM" not in rows[0].find_element("css selector", "td.quality").text:
            return None
        row = rows[0]
        return {
            "status": row.find_element("css selector", "td.status").text,
            "text": row.text,
            "thumb": row.find_element("css selector", "img.thumb").get_attribute("src"),
            "buttons": [b.text for b in row.find_elements("css selector", "button")],
        }

    row = _wait(completed_row, 60, "the completed video with its quality in the job list")
    assert "completed" in row["status"]
    assert "mode: showcase" in row["text"] and "Thermo Mug" in row["text"]
    assert row["thumb"].startswith("blob:")
    thumbnail_width = "return document.querySelector(arguments[0]).naturalWidth"
    assert driver.execute_script(thumbnail_width, f"{row_css} img") > 0
    assert row["buttons"] == ["Download", "Delete"]

    # (d) A screenshot of the page as it is now.
    shot = tmp_path / "preview_page.png"
    driver.save_screenshot(str(shot))
    if os.environ.get("SHOPREEL_ARTIFACTS"):
        kept = Path(os.environ["SHOPREEL_ARTIFACTS"])
        kept.mkdir(parents=True, exist_ok=True)
        shot = Path(shutil.copy(shot, kept / "preview_page.png"))
    print(f"screenshot: {shot}")

    # The Delete button removes it (DELETE /v1/videos/{id} with the key) and the list follows.
    delete = f"{row_css} button:nth-of-type(2)"
    _wait(lambda: driver.find_element("css selector", delete).click() or True, 10, "the Delete button")
    listed = f"tr[data-video-id='{video_id}']"
    _wait(lambda: not driver.find_elements("css selector", listed), 30, "the deleted video to leave the list")

    # (c) Nothing went wrong in the browser since the key was typed.
    assert _severe(driver.get_log("browser")) == []
    assert not errors.is_displayed()
