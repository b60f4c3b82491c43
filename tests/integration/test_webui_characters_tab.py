"""Opt-in: creating a OneActor character from the *Characters* tab of a running WebUI's page (A1111 / gradio 3.41,
Forge and Forge Neo / gradio 4.40), driven in Debian's Chromium with Playwright, then using it through the API.

Needs ``CONSISTENT_STORY_WEBUI_URL`` and ``CONSISTENT_STORY_ONEACTOR_CHECKPOINT`` (the title of a standard-size
SD1.5 or SDXL checkpoint on that server, loaded first through the API); creation runs at 256² with one auxiliary
image and one tuning step. The character file it makes (``ci_tab_hero``) is replaced on every run.
"""
from __future__ import annotations

import json
import os
import time

import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS as ARGS
from tests.integration.test_oneactor_api import CHECKPOINT, URL, call, image, listed, txt2img

pytestmark = pytest.mark.skipif(not (URL and CHECKPOINT and os.path.exists(CHROMIUM)),
                                reason="set CONSISTENT_STORY_WEBUI_URL and CONSISTENT_STORY_ONEACTOR_CHECKPOINT "
                                "(and have chromium)")
sync_api = pytest.importorskip("playwright.sync_api") if URL else None
NAME = "ci_tab_hero"


def fill_number(page, name: str, value: int) -> None:
    """A gradio Number, or a Slider's number box, set as a user types it (both gradio versions)."""
    box = page.locator(f"#consistent_story_oa_{name} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def test_create_a_character_from_the_tab_and_use_it():
    before = call("/sdapi/v1/options")[1]["sd_model_checkpoint"]
    assert call("/sdapi/v1/options", {"sd_model_checkpoint": CHECKPOINT})[0] == 200
    status, plain = txt2img()
    assert status == 200, plain
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1300})
            page.goto(URL, timeout=180_000)
            page.wait_for_selector("#txt2img_prompt textarea", timeout=180_000)
            page.get_by_role("tab", name="Characters").click()
            page.locator("#consistent_story_oa_name textarea, #consistent_story_oa_name input").first.fill(NAME)
            page.locator("#consistent_story_oa_prompt textarea").fill("a photo of a hobbit with a red cloak")
            page.locator("#consistent_story_oa_base_word textarea, #consistent_story_oa_base_word input").first \
                .fill("hobbit")
            fill_number(page, "seed", 5)
            for name, value in (("auxiliaries", 1), ("tuning_steps", 1), ("steps", 2), ("width", 256),
                                ("height", 256)):
                fill_number(page, name, value)
            page.locator("#consistent_story_oa_overwrite input").check()
            started = time.time()
            page.locator("#consistent_story_oa_create").click()
            page.wait_for_function(f"""() => (document.querySelector('#consistent_story_oa_status') || {{}})
                .innerText?.includes('Saved {NAME}')""", timeout=1_800_000)
            status_text = page.locator("#consistent_story_oa_status").inner_text()
            assert f"<oneactor:{NAME}>" in status_text and "hobbit" in status_text
            assert NAME in page.locator("#consistent_story_oa_list").inner_text()
            browser.close()
        made = listed()[NAME]
        assert made["base_word"] == "hobbit" and made["seed"] == 5
        status, tagged = txt2img(prompt=f"a hobbit in a forest <oneactor:{NAME}>")
        assert status == 200, tagged
        assert image(tagged) != image(plain)
        assert f'OneActor hashes: "{NAME}: {made["hash"]}"' in json.loads(tagged["info"])["infotexts"][0]
        print(f"created from the tab in {time.time() - started:.0f} s")
    finally:
        call("/sdapi/v1/options", {"sd_model_checkpoint": before})
