"""The demo page in a real headless Chromium (Debian's /usr/bin/chromium via Playwright).

Opens the page, sends a message with a picture, sees the reply stream and the generated
image appear in the chat, moves the α slider, switches on the comparison and sees the TA and
TA+VEH images side by side with their labels; undo, retry and clear work; the stop button
ends a video while it is denoised; closing the tab deletes the session's files.
Chromium may only reach 127.0.0.1: any other request fails the test. Screenshots go to
tests/artifacts/. Skipped only where /usr/bin/chromium is absent (`.ci/run` installs it).
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from test_app import ASSETS, app_server

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        # Name resolution fails for every host but the local one: nothing leaves the machine.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")

# Records every text the last assistant message shows, to see the reply arrive in pieces.
WATCH_REPLY = """() => {
  window.replyStates = [];
  const chat = document.querySelector('#xvila-chat');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('.message.bot, [data-testid="bot"]');
    if (!bots.length) return;
    const text = bots[bots.length - 1].innerText.trim();
    const states = window.replyStates;
    if (text && states[states.length - 1] !== text) states.push(text);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def loaded_images(page, selector: str) -> list[str]:
    """src of the images under `selector` that the browser actually decoded."""
    return page.eval_on_selector_all(selector, "els => els.filter(e => e.complete && e.naturalWidth > 0).map(e => e.src)")


def wait_until_idle(page) -> None:
    """The turn has ended: the chat enables its retry button again."""
    from playwright.sync_api import expect

    expect(page.get_by_role("button", name="Retry").last).to_be_enabled(timeout=60_000)


def send(page, text: str) -> None:
    box = page.locator("#xvila-input textarea")
    box.fill(text)
    box.press("Enter")


def test_chat_in_a_real_browser(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with app_server(tmp_path, "--checkpoint", "tiny-random") as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            outside = []
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("http://127.0.0.1")
                       else (outside.append(route.request.url), route.abort()))
            page.goto(url)
            expect(page.locator("#xvila-header")).to_contain_text("Serving tiny-random on cpu", timeout=60_000)
            expect(page.locator("#xvila-header")).to_contain_text("Untrained")

            # Small, fast settings through the page's own controls.
            page.get_by_text("Generation settings").click()
            steps = page.locator("#xvila-steps input[type=number]")
            steps.fill("2")
            steps.press("Enter")
            page.get_by_label("image", exact=True).check()

            # 1. A message with a picture: the reply streams, then an image appears in the chat.
            page.evaluate(WATCH_REPLY)
            page.locator("#xvila-input input[type=file]").set_input_files(str(ASSETS / "lighthouse.png"))
            expect(page.locator("#xvila-input img")).to_have_count(1, timeout=20_000)  # the upload's preview
            send(page, "Paint this lighthouse at night")
            page.wait_for_function(
                """() => [...document.querySelectorAll('#xvila-chat img')].some(
                       i => i.src.includes('/outputs/') && i.complete && i.naturalWidth > 0)""", timeout=60_000)
            expect(page.locator("#xvila-chat")).to_contain_text("image · TA+VEH, α 0.60 · seed 0")
            assert any("lighthouse" in src for src in loaded_images(page, "#xvila-chat img"))  # the user's picture
            states = page.evaluate("window.replyStates")
            assert len(states) >= 3, states  # the reply grew in several steps, it did not arrive at once
            wait_until_idle(page)
            page.screenshot(path=str(ARTIFACTS / "app_chat.png"), full_page=True)

            # 2. α to 0.3 and the comparison on: TA and TA+VEH side by side, labelled.
            page.locator("#xvila-alpha input[type=range]").fill("0.3")
            expect(page.locator("#xvila-alpha input[type=number]")).to_have_value("0.3")
            page.locator("#xvila-compare input[type=checkbox]").check()
            send(page, "Once more, and compare")
            gallery = page.locator("#xvila-chat .gallery-container").last
            expect(gallery).to_contain_text("TA+VEH (α 0.30)", timeout=60_000)
            expect(gallery.get_by_text("TA", exact=True)).to_be_visible()
            page.wait_for_function(
                """() => { const g = [...document.querySelectorAll('#xvila-chat .gallery-container')].pop();
                           const imgs = g ? [...g.querySelectorAll('img')] : [];
                           return imgs.length === 2 && imgs.every(i => i.complete && i.naturalWidth > 0); }""",
                timeout=30_000)
            boxes = [i.bounding_box() for i in gallery.locator("img").all()]
            assert boxes[0]["x"] + boxes[0]["width"] <= boxes[1]["x"] + 1  # side by side, TA on the left
            assert abs(boxes[0]["y"] - boxes[1]["y"]) < 2
            srcs = loaded_images(page, "#xvila-chat .gallery-container img")[-2:]
            assert srcs[0].endswith("-image-ta.png") and srcs[1].endswith("-image-ta-veh.png")
            wait_until_idle(page)
            gallery.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "app_compare.png"), full_page=True)

            # 3. Undo gives the last message back to the box; retry redoes a reply; clear empties the chat.
            users = page.locator("#xvila-chat .message.user")
            expect(users).to_have_count(2)
            page.get_by_role("button", name="Undo").last.click()
            expect(users).to_have_count(1)
            expect(page.locator("#xvila-input textarea")).to_have_value("Once more, and compare")
            first = loaded_images(page, "#xvila-chat img[src*='/outputs/']")
            page.get_by_role("button", name="Retry").last.click()
            page.wait_for_function(
                """old => [...document.querySelectorAll('#xvila-chat img')].some(
                       i => i.src.includes('/outputs/') && !old.includes(i.src) && i.complete && i.naturalWidth > 0)""",
                arg=first, timeout=60_000)
            expect(users).to_have_count(1)  # the turn was redone, not added
            wait_until_idle(page)
            page.get_by_role("button", name="Clear").click()
            expect(page.locator("#xvila-chat .message")).to_have_count(0)

            # 4. A long video, stopped while it is being denoised: the progress bar shows the step
            #    count, the stop button ends the turn there, and no video is written.
            steps.fill("100")
            steps.press("Enter")
            page.get_by_label("video", exact=True).check()
            send(page, "A long video, please")
            expect(page.locator("#xvila-chat progress")).to_have_count(1, timeout=30_000)
            progress = re.compile(r"generating video \(TA\): step \d+/100")  # TA: no picture since the clear
            expect(page.locator("#xvila-chat")).to_contain_text(progress)
            page.get_by_role("button", name="Stop").click()
            expect(page.locator("#xvila-chat")).to_contain_text("stopped", timeout=20_000)
            expect(page.locator("#xvila-chat progress")).to_have_count(0)
            assert page.locator("#xvila-chat video").count() == 0
            assert outside == []  # the page loaded and ran without leaving 127.0.0.1

            # 5. Closing the tab ends the session: its generated files are deleted.
            page.close()
            deadline = time.time() + 20
            while status(srcs[0]) == 200 and time.time() < deadline:
                time.sleep(0.5)
            assert status(srcs[0]) in (403, 404)
        finally:
            browser.close()
    # A stopped server leaves nothing behind: its whole folder (uploads, sessions) is gone.
    workdir = Path(urllib.parse.unquote(srcs[0].split("file=", 1)[1]).split("/xvila-sessions/")[0])
    assert workdir.name.startswith("xvila-demo-") and not workdir.exists()
