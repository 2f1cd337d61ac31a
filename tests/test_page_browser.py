"""The moderators' page in a real headless Chromium (Debian's chromium + chromium-driver,
driven by selenium) against ``phash-trio run`` on the local network: it signs in with an API
key, shows a match the test pushes through the pipeline, and blurs its thumbnail."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_helpers import GUARD, harness, host_blobs

from phash_trio.api.auth import add_key
from phash_trio.testing.capture import CaptureBuilder, demo_images
from phash_trio.testing.redis_server import RedisProcess

pytestmark = pytest.mark.e2e

CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--window-size=1280,900",
)
#: Where the screenshot of the last run is kept for people to look at.
SCREENSHOT = Path(__file__).resolve().parents[1] / "bench" / "out" / "page.png"


def _browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("chromium and chromium-driver are not installed (./dev installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def _wait(browser: Any, script: str, within: float = GUARD) -> Any:
    """Poll a JavaScript expression in the page until it is truthy."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = browser.execute_script("return " + script)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"page never satisfied {script!r}")


async def test_page_signs_in_shows_a_pushed_match_and_blurs_it(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """Sign in (the key goes in a header; an HttpOnly cookie comes back and no URL carries the
    key), push a matching post through the pipeline, see its row live with rule, distance,
    bsky.app link and actions, its thumbnail blurred until clicked; take a screenshot."""
    images = demo_images()
    builder = CaptureBuilder(images, seed=21)
    quiet = builder.post(builder.images_embed(["coffee.jpg"]))
    pushed = builder.post(builder.images_embed(["spitfire.jpg"]))
    keys = tmp_path / "keys"
    key = add_key(keys, "moderator", ["read"])
    browser = await trio.to_thread.run_sync(_browser)
    try:
        async with harness(redis_proc.url, tmp_path, [quiet]) as h:
            service = await h.start(API_KEYS_FILE=str(keys))
            page = f"http://127.0.0.1:{service.metrics_port}/"

            def sign_in() -> None:
                browser.get(page)
                _wait(browser, "!document.getElementById('signin').hidden")
                browser.find_element("id", "key").send_keys(key)
                browser.find_element("css selector", "#signin button").click()
                _wait(browser, "document.getElementById('status').textContent === 'live'")

            await trio.to_thread.run_sync(sign_in)
            host_blobs(h.net, [pushed], images)
            h.net.replay.append([pushed])
            uri = "at://{}/app.bsky.feed.post/{}".format(pushed["did"], pushed["commit"]["rkey"])

            def look() -> dict[str, Any]:
                row = f"document.querySelector('tr[data-uri=\"{uri}\"]')"
                _wait(browser, f"{row} && {row}.querySelector('.actions').children.length >= 2")
                img = f"{row}.querySelector('img.thumb')"
                _wait(browser, f"{img}.complete && {img}.naturalWidth > 0")
                seen = {
                    "cells": browser.execute_script(
                        f"return Array.from({row}.cells).map(c => c.textContent)"
                    ),
                    "link": browser.execute_script(f"return {row}.querySelector('a').href"),
                    "blurred": browser.execute_script(
                        f"return {img}.classList.contains('blurred')"
                    ),
                    "filter": browser.execute_script(f"return getComputedStyle({img}).filter"),
                    "matches": browser.find_element("id", "n-match").text,
                    "cookies": browser.get_cookies(),
                    "url": browser.current_url,
                }
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                browser.save_screenshot(str(SCREENSHOT))
                browser.execute_script(f"{img}.click()")
                seen["after_click"] = browser.execute_script(
                    f"return getComputedStyle({img}).filter"
                )
                return seen

            seen = await trio.to_thread.run_sync(look)
            await h.stop(service)
    finally:
        await trio.to_thread.run_sync(browser.quit)
    cells = seen["cells"]
    assert cells[1] == "example-spitfire" and cells[2].isdigit()
    assert cells[4] == pushed["did"]
    assert "label_post" in cells[5] and "takedown_post" in cells[5]
    assert (
        seen["link"] == f"https://bsky.app/profile/{pushed['did']}/post/{pushed['commit']['rkey']}"
    )
    assert seen["blurred"] and seen["filter"].startswith("blur(")
    assert seen["after_click"] == "none"
    assert int(seen["matches"]) >= 1
    session = [c for c in seen["cookies"] if c["name"] == "phash_session"]
    assert session and session[0]["httpOnly"] and key not in session[0]["value"]
    assert key not in seen["url"]
