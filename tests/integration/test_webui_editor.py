"""Opt-in: the story editor in a running WebUI's real page (A1111 1.10 / gradio 3.41 or Forge / gradio 4.40),
driven in Debian's Chromium with Playwright.

Set ``CONSISTENT_STORY_WEBUI_URL`` (the WebUI started with this extension) to run; ``CONSISTENT_STORY_CHROMIUM``
overrides the browser (default ``/usr/bin/chromium``); ``CONSISTENT_STORY_SCREENSHOTS`` names a folder for
screenshots (light and dark theme). The tests share one page and run in order: open the accordion, pick an
example, type a story with tag completion, check the preview against the planning functions, select a line from
a row, generate (tiny sizes), and compare every image's infotext with the preview's rows.
"""
from __future__ import annotations

import json
import os
import pathlib

import pytest

from lib_consistency.settings import Settings
from lib_consistency.story.examples import EXAMPLES
from lib_consistency.story.preview import preview_story
from tests.browser import CHROMIUM, CHROMIUM_ARGS as ARGS

URL = os.environ.get("CONSISTENT_STORY_WEBUI_URL", "").rstrip("/")
SHOTS = os.environ.get("CONSISTENT_STORY_SCREENSHOTS", "")
pytestmark = pytest.mark.skipif(not URL or not os.path.exists(CHROMIUM),
                                reason="set CONSISTENT_STORY_WEBUI_URL to a running WebUI (and have chromium)")
sync_api = pytest.importorskip("playwright.sync_api") if URL else None

P = "#script_txt2img_consistent_story_"
TYPED = ["Bob: a tall man in a red coat", "Al: a small boy with a blue kite", "---",
         "[Bob] walks along the beach # Morning", "[Bob] [Al] fly the kite together", "[NC] gulls over the waves"]
STYLE, SEED = "watercolor", 1234


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser):
    page = browser.new_page(viewport={"width": 1500, "height": 1300})
    page.ours = []  # console errors and warnings raised by this extension's scripts
    page.on("console", lambda m: page.ours.append(m.text) if m.type in ("error", "warning") and
            "consistent" in json.dumps(m.location).lower() else None)
    page.on("pageerror", lambda e: page.ours.append(str(e)) if "consistent" in (e.stack or "").lower() else None)
    page.goto(URL, timeout=180_000)
    page.wait_for_selector("#txt2img_prompt textarea", timeout=180_000)
    yield page
    page.close()


def shot(page, name: str, selector: str = f"{P}story") -> None:
    """The viewport with ``selector`` scrolled to its top, into CONSISTENT_STORY_SCREENSHOTS (when set)."""
    if SHOTS:
        pathlib.Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.eval_on_selector(selector, "n => n.scrollIntoView({block: 'start'})")
        page.screenshot(path=str(pathlib.Path(SHOTS) / f"{name}.png"))


def story_box(page):
    return page.locator(f"{P}story textarea")


def preview_rows(page) -> list[dict]:
    return page.eval_on_selector_all(f"{P}preview tr.cs-frame", """rows => rows.map(r => ({
        line: r.dataset.line, count: r.dataset.count, limit: r.dataset.limit,
        cells: [...r.cells].map(c => c.innerText.trim())}))""")


def wait_rows(page, count: int, seed: str | None = None, prefix: str = P) -> list[dict]:
    page.wait_for_function(
        """([sel, n, seed]) => { const rows = document.querySelectorAll(sel);
            return rows.length === n && (seed === null || rows[0].cells[4].innerText.trim() === seed); }""",
        arg=[f"{prefix}preview tr.cs-frame", count, seed], timeout=60_000)
    return preview_rows(page)


def contrast(page, selector: str) -> float:
    """WCAG contrast ratio of the element's text colour against the first opaque background behind it."""
    return page.eval_on_selector(selector, """node => {
        const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
        let back = null;
        for (let n = node; n && !back; n = n.parentElement) {
            const c = rgb(getComputedStyle(n).backgroundColor);
            if (c.length < 4 || c[3] > 0) back = c;
        }
        back = back || [255, 255, 255];
        const lum = (c) => { const [r, g, b] = c.slice(0, 3).map((v) => { v /= 255;
            return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
            return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
        const [a, b] = [lum(rgb(getComputedStyle(node).color)), lum(back)].sort((x, y) => y - x);
        return (a + 0.05) / (b + 0.05); }""")


def test_opening_the_accordion_shows_the_editor(page):
    page.click(f"{P}enabled .label-wrap")
    page.wait_for_selector(f"{P}story textarea", state="visible")
    for part in ("example", "load", "save", "preview"):  # gradio 3.41 repeats an HTML block's id inside it
        assert page.locator(f"{P}{part}").count() in (1, 2 if part == "preview" else 1), part
    assert page.locator(f"{P}refresh").count() == 1  # hidden, clicked by the editor script


def test_an_example_fills_the_story_and_the_preview(page):
    page.click(f"{P}example input")
    page.locator("ul.options li", has_text="Three characters").first.click()
    rows = wait_rows(page, 7)
    assert story_box(page).input_value() == EXAMPLES["Three characters with [NC] frames"]
    assert [r["cells"][1] for r in rows][:3] == ["Mira", "Mira, Pip", "Tomo"]
    for selector in (".cs-preview", ".cs-preview td", ".cs-preview th"):
        assert contrast(page, f"{P}preview {selector}") >= 4.5, selector
    shot(page, "example-light")


def test_typing_a_story_with_completion_and_the_preview_follows(page):
    box = story_box(page)
    box.click()
    box.press("Control+a")
    box.press("Delete")
    box.type("\n".join(TYPED[:4]) + "\n")
    box.type("[")
    popup = page.locator(".cs-complete")
    popup.wait_for(state="visible")
    assert popup.locator(".cs-complete-item").all_inner_texts() == ["Bob", "Al", "NC"]
    box.type("a")
    assert popup.locator(".cs-complete-item").all_inner_texts() == ["Al"]
    shot(page, "completion")
    box.press("Enter")
    assert popup.count() == 0
    box.press("Control+z")  # one undo step takes the completion back, to the typed "[a"
    assert box.input_value().endswith("\n[a")
    box.press("Control+Shift+z")
    assert box.input_value().endswith("\n[Al] ")
    box.press("Backspace")
    box.press("Backspace")
    box.press("Backspace")
    box.press("Backspace")
    box.press("Backspace")
    box.type("[Bob] [Al] fly the kite together\n" + TYPED[5])
    assert box.input_value() == "\n".join(TYPED)
    box.press("Alt+ArrowUp")  # the last line moves up one; one undo step puts it back
    assert box.input_value() == "\n".join(TYPED[:4] + [TYPED[5], TYPED[4]])
    box.press("Control+z")
    assert box.input_value() == "\n".join(TYPED)
    page.fill("#txt2img_prompt textarea", STYLE)
    page.fill("#txt2img_seed input", str(SEED))
    rows = wait_rows(page, 3, str(SEED))
    expected = preview_story(Settings.from_dict({"enabled": True, "story": "\n".join(TYPED)}), STYLE, SEED)
    assert [r["cells"][3] for r in rows] == [e.prompt for e in expected]
    assert [r["cells"][4] for r in rows] == [str(e.seed) for e in expected]
    assert [int(r["line"]) for r in rows] == [4, 5, 6]


def test_clicking_a_row_selects_its_story_line(page):
    page.locator(f"{P}preview tr.cs-frame").nth(1).click()
    start, end = story_box(page).evaluate("t => [t.selectionStart, t.selectionEnd]")
    text = story_box(page).input_value()
    assert text[start:end] == TYPED[4]


def test_generated_images_carry_the_prompts_and_seeds_the_preview_showed(page):
    rows = preview_rows(page)
    for selector, value in (("#txt2img_width input[type=number]", "64"), ("#txt2img_height input[type=number]", "64"),
                            ("#txt2img_steps input[type=number]", "2")):
        page.fill(selector, value)
        page.press(selector, "Tab")
    story_box(page).press("Control+Enter")  # the WebUI's own shortcut, from the story box
    page.wait_for_function("""n => { const t = document.querySelector('#generation_info_txt2img textarea');
        try { return JSON.parse(t.value).all_prompts.length === n; } catch (e) { return false; } }""",
                           arg=len(rows), timeout=900_000)
    info = json.loads(page.input_value("#generation_info_txt2img textarea"))
    first = info["index_of_first_image"]
    infotexts = info["infotexts"][first:first + len(rows)]
    assert [t.splitlines()[0] for t in infotexts] == [r["cells"][3] for r in rows]
    assert [f"Seed: {r['cells'][4]}," in t for r, t in zip(rows, infotexts)] == [True] * len(rows)
    shot(page, "generated", "#txt2img_gallery")


def test_per_line_token_counts_once_a_model_is_loaded(page):
    box = story_box(page)
    box.press("End")
    box.type(" ")  # a model is loaded now (Forge loads it with the first generation): refresh
    page.wait_for_function("sel => document.querySelectorAll(sel).length === 3",
                           arg=f"{P}preview tr.cs-frame[data-count]", timeout=60_000)
    rows = preview_rows(page)
    page.wait_for_function("n => document.querySelectorAll('.cs-pill').length === n", arg=len(rows))
    pills = page.locator(".cs-pill").all_inner_texts()
    # CLIP's 75-token chunk; on Flux (CONSISTENT_STORY_FLUX=1) T5's budget, 511 (dev) or 255 (schnell)
    limits = {"511", "255"} if os.environ.get("CONSISTENT_STORY_FLUX") == "1" else {"75"}
    assert {r["limit"] for r in rows} <= limits and pills == [f"{r['count']}/{r['limit']}" for r in rows]
    assert not page.ours, page.ours


def test_load_and_save_a_story_file(page, tmp_path):
    story = tmp_path / "comic.json"
    story.write_text(json.dumps({"characters": {"Kim": "a girl in a yellow hat"},
                                 "frames": ["[Kim] waves", "[Kim] runs # Go"]}), encoding="utf-8")
    with page.expect_file_chooser() as chooser:
        page.click(f"{P}load")
    chooser.value.set_files(str(story))
    page.wait_for_function("([sel, text]) => document.querySelector(sel).value === text",
                           arg=[f"{P}story textarea", story.read_text(encoding="utf-8")])
    rows = wait_rows(page, 2)
    assert [r["cells"][2] for r in rows] == ["", "Go"] and rows[0]["line"] is None  # the JSON form has no lines
    assert page.locator(".cs-file-status").inner_text() == "Loaded comic.json"
    with page.expect_download() as download:
        page.click(f"{P}save")
    assert download.value.suggested_filename == "story.json"
    assert pathlib.Path(download.value.path()).read_text(encoding="utf-8") == story.read_text(encoding="utf-8")
    bad = tmp_path / "broken.json"
    bad.write_text("{'no': json}", encoding="utf-8")
    with page.expect_file_chooser() as chooser:
        page.click(f"{P}load")
    chooser.value.set_files(str(bad))
    page.wait_for_function("() => document.querySelector('.cs-file-status').innerText.startsWith('broken.json')")
    assert "invalid JSON" in page.locator(".cs-file-status").inner_text()
    assert story_box(page).input_value() == story.read_text(encoding="utf-8")  # a refused file changes nothing


def test_the_img2img_tab_has_its_own_editor(page):
    page.locator("#tabs button", has_text="img2img").first.click()
    prefix = P.replace("txt2img", "img2img")
    page.click(f"{prefix}enabled .label-wrap")
    box = page.locator(f"{prefix}story textarea")
    box.click()
    box.type("a paper boat\nfloats down a gutter\n[")
    page.locator(".cs-complete .cs-complete-item").first.wait_for()
    assert page.locator(".cs-complete .cs-complete-item").all_inner_texts() == ["NC"]  # shorthand: only [NC]
    box.press("Enter")
    box.type("a rainy street")
    page.fill("#img2img_prompt textarea", "ink")
    page.wait_for_function("sel => [...document.querySelectorAll(sel)].map(r => r.cells[3].innerText.trim()).join('|')"
                           " === 'ink, a paper boat, floats down a gutter|ink, a rainy street'",
                           arg=f"{prefix}preview tr.cs-frame", timeout=60_000)
    assert not page.ours, page.ours


def test_dark_theme(browser):
    page = browser.new_page(viewport={"width": 1500, "height": 1300})
    page.goto(URL + "/?__theme=dark", timeout=180_000)
    page.wait_for_selector("#txt2img_prompt textarea", timeout=180_000)
    page.click(f"{P}enabled .label-wrap")
    page.click(f"{P}example input")
    page.locator("ul.options li", has_text="Long story").first.click()
    wait_rows(page, 16)
    for selector in (".cs-preview", ".cs-preview td", ".cs-preview th"):
        assert contrast(page, f"{P}preview {selector}") >= 4.5, selector
    shot(page, "preview-dark")
    page.close()
