"""Opt-in: the README's pictures, taken from a running WebUI's real page in Debian's Chromium with Playwright.

Set ``CONSISTENT_STORY_WEBUI_URL`` (the WebUI started with this extension and an SD1.5 checkpoint loaded) and
``CONSISTENT_STORY_README_IMAGES`` (the folder to write, ``docs/images``) to run. The tests share one page and run in
order: the accordion with an example story and its frames preview, the story editor's tag completion, a short
StorySync story generated at 256² with *Show masks* and the storyboard on (the storyboard and the mask images are
the generated files, fetched from the gallery), and the *Characters* tab with its form filled in (nothing is created).
Every picture is scaled down to at most ``WIDTH`` pixels and written as WebP (``QUALITY``), so the folder stays a few
hundred kB. Written for A1111 1.10 (gradio 3.41): its gallery lists each image twice, which ``gallery_images`` folds.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import re

import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS as ARGS

URL = os.environ.get("CONSISTENT_STORY_WEBUI_URL", "").rstrip("/")
FOLDER = os.environ.get("CONSISTENT_STORY_README_IMAGES", "")
pytestmark = pytest.mark.skipif(not (URL and FOLDER and os.path.exists(CHROMIUM)),
                                reason="set CONSISTENT_STORY_WEBUI_URL and CONSISTENT_STORY_README_IMAGES "
                                "(and have chromium)")
sync_api = pytest.importorskip("playwright.sync_api") if URL and FOLDER else None
Image = pytest.importorskip("PIL.Image") if URL and FOLDER else None

P = "#script_txt2img_consistent_story_"
WIDTH, QUALITY = 880, 80
STORY = ["Mira: a young woman with short red hair and a green raincoat", "Pip: a small white dog with a blue collar",
         "---", "[Mira] [Pip] walk through the rain # Rain", "[Mira] reads a map under a lamp # Lost",
         "[Pip] sniffs a puddle # Found"]
STYLE, SEED, SIZE, STEPS = "storybook illustration, soft colours", 42, 256, 4


def save(image, name: str) -> pathlib.Path:
    """``image`` (PIL) scaled down to at most WIDTH pixels wide, as ``FOLDER/name.webp``."""
    if image.width > WIDTH:
        image = image.resize((WIDTH, round(image.height * WIDTH / image.width)), Image.LANCZOS)
    path = pathlib.Path(FOLDER) / f"{name}.webp"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").save(path, "WEBP", quality=QUALITY, method=6)
    return path


def snap(page, *selectors: str, pad: int = 8):
    """The page around the union of ``selectors``' boxes (the first one scrolled to the top), ``pad`` pixels more."""
    page.eval_on_selector(selectors[0], "n => n.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(300)
    boxes = [page.locator(s).first.bounding_box() for s in selectors]
    scroll_x, scroll_y = page.evaluate("[scrollX, scrollY]")  # bounding boxes are viewport-relative, clips are not
    left, top = min(b["x"] for b in boxes) + scroll_x - pad, min(b["y"] for b in boxes) + scroll_y - pad
    right = max(b["x"] + b["width"] for b in boxes) + scroll_x + pad
    bottom = max(b["y"] + b["height"] for b in boxes) + scroll_y + pad
    clip = {"x": max(0, left), "y": max(0, top), "width": right - max(0, left), "height": bottom - max(0, top)}
    return Image.open(io.BytesIO(page.screenshot(clip=clip, full_page=True)))


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1366, "height": 1400})
        page.goto(URL, timeout=180_000)
        page.wait_for_selector("#txt2img_prompt textarea", timeout=180_000)
        yield page
        browser.close()


def rows(page, count: int) -> None:
    page.wait_for_function("([sel, n]) => document.querySelectorAll(sel).length === n",
                           arg=[f"{P}preview tr.cs-frame", count], timeout=60_000)


def test_accordion_with_the_frames_preview(page):
    page.click(f"{P}enabled .label-wrap")
    page.wait_for_selector(f"{P}story textarea", state="visible")
    page.click(f"{P}preset input")
    page.locator("ul.options li", has_text=re.compile(r"^\W*StorySync\s*$")).first.click()
    page.fill("#txt2img_prompt textarea", STYLE)
    page.fill("#txt2img_seed input", str(SEED))
    page.locator(f"{P}story textarea").fill("\n".join(STORY))
    rows(page, 3)
    page.wait_for_timeout(1000)  # the per-line token pills
    save(snap(page, f"{P}enabled .label-wrap", f"{P}preview"), "accordion-preview")


def test_tag_completion(page):
    box = page.locator(f"{P}story textarea")
    box.press("Control+End")
    box.type("\n[")
    popup = page.locator(".cs-complete")
    popup.wait_for(state="visible")
    assert popup.locator(".cs-complete-item").all_inner_texts() == ["Mira", "Pip", "NC"]
    save(snap(page, f"{P}story", ".cs-complete"), "completion")
    box.press("Escape")
    box.press("Backspace")
    box.press("Backspace")
    assert box.input_value() == "\n".join(STORY)


def gallery_images(page) -> list:
    """The gallery's images, full size, in gallery order."""
    sources = page.eval_on_selector_all("#txt2img_gallery .thumbnail-item img", "imgs => imgs.map(i => i.src)")
    sources = list(dict.fromkeys(sources))  # gradio 3.41 lists each image twice (the grid and the preview strip)
    return [Image.open(io.BytesIO(page.request.get(src).body())) for src in sources]


def test_storysync_story_with_storyboard_and_masks(page):
    page.click(f"{P}group_StorySync .label-wrap")
    page.locator(f"{P}show_masks input").check()
    for selector, value in (("#txt2img_width input[type=number]", SIZE), ("#txt2img_height input[type=number]", SIZE),
                            ("#txt2img_steps input[type=number]", STEPS)):
        page.fill(selector, str(value))
        page.press(selector, "Tab")
    page.click("#txt2img_generate")
    page.wait_for_function("""() => { const t = document.querySelector('#generation_info_txt2img textarea');
        try { return JSON.parse(t.value).all_prompts.length === 3; } catch (e) { return false; } }""",
                           timeout=1_800_000)
    page.wait_for_timeout(1000)
    info = json.loads(page.input_value("#generation_info_txt2img textarea"))
    images = gallery_images(page)[info["index_of_first_image"]:]
    frames, board, masks = images[:3], images[3], images[4:]
    assert [f.size for f in frames + masks] == [(SIZE, SIZE)] * 6 and board.width > 3 * SIZE
    save(board, "storyboard")
    strip = Image.new("RGB", (3 * SIZE + 2 * 8, SIZE), "white")
    for i, mask in enumerate(masks):
        strip.paste(mask.convert("RGB"), (i * (SIZE + 8), 0))
    save(strip, "storysync-masks")


def test_characters_tab(page):
    page.locator("#tabs button", has_text="Characters").first.click()
    page.locator("#consistent_story_oa_name textarea, #consistent_story_oa_name input").first.fill("Mira")
    page.locator("#consistent_story_oa_prompt textarea").fill("a photo of a young woman with short red hair")
    page.locator("#consistent_story_oa_base_word textarea, #consistent_story_oa_base_word input").first.fill("woman")
    folder = page.locator("#consistent_story_oa_list p", has_text="Folder: ").first
    # the picture is committed: the character folder's absolute path on this machine becomes the WebUI-relative one
    folder.evaluate("p => { p.textContent = p.textContent.replace(/Folder: .*?(models[\\/\\\\])/, 'Folder: $1'); }")
    assert folder.inner_text().startswith("Folder: models")
    page.wait_for_timeout(500)
    save(snap(page, "#tab_consistent_story_characters"), "characters-tab")
