"""javascript/story_editor.js in headless Chromium (the system's Debian package, driven by Playwright).

``accordion.html`` imitates the accordion's DOM in gradio 3.41 (A1111) and 4.40 (Forge) with stubs of the host's
globals and a host-like keydown listener; its refresh button calls back into Python, which renders the preview with
the real ``preview_panel`` and a real CLIP tokenizer, so the tests exercise the Python -> JS contract.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import pathlib
import re
import shutil
import threading

import pytest

from lib_consistency.story.preview import preview_panel, story_hash
from tests.browser import CHROMIUM, CHROMIUM_ARGS as ARGS

ROOT = pathlib.Path(__file__).resolve().parents[2]
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None
_MISSING = ("playwright is not installed (pip install -r tests/requirements.txt)" if sync_playwright is None else
            f"no Chromium at {CHROMIUM} (install Debian's chromium or set CONSISTENT_STORY_CHROMIUM)"
            if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)) else None)
if _MISSING:
    if os.environ.get("CONSISTENT_STORY_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser tests required (CONSISTENT_STORY_REQUIRE_BROWSER=1) but {_MISSING}", pytrace=False)
    pytest.skip(f"browser tests skipped: {_MISSING}", allow_module_level=True)

P = "script_txt2img_consistent_story_"
STORY = f"#{P}story textarea"
SETTINGS = {"consolidate": False, "reweighting": "none", "ipca": False}  # per-frame counts, one per own prompt
NAMED = ("Bob: a man with a beard\nAlice Smith: a woman with red hair\n// Carl: a commented-out character\n---\n"
         "[Bob] reading a newspaper # Monday\n// a comment line\n[Bob] and [Alice Smith] having lunch\n"
         "[NC] a rainy street")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(ROOT)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which(CHROMIUM) or CHROMIUM, args=ARGS)
        yield b
        b.close()


class Page:
    """One fixture page; ``calls``: the (story, host) pairs the Python refresh received."""

    def __init__(self, page, calls):
        self.page, self.calls = page, calls

    def __getattr__(self, name):
        return getattr(self.page, name)

    def story(self) -> str:
        return self.page.eval_on_selector(STORY, "t => t.value")

    def set_story(self, text: str, caret: int | None = None):
        """Type-free setup: the value set the way gradio sets it, then focus and caret."""
        self.page.eval_on_selector(STORY, "(t, [v, c]) => { t.value = v; t.focus(); t.setSelectionRange(c, c); }",
                                   [text, len(text) if caret is None else caret])

    def selection(self):
        return self.page.eval_on_selector(STORY, "t => [t.selectionStart, t.selectionEnd]")

    def refreshed(self):
        """Wait until the preview belongs to the story box's current text."""
        self.page.wait_for_function(
            """() => { const p = document.querySelector('#%spreview .cs-preview');
                const t = document.querySelector('%s');
                return p && p.dataset.storyHash === consistentStoryEditor.hash(t.value); }""" % (P, STORY))

    def popup(self):
        return self.page.evaluate("() => { const p = consistentStoryEditor.popup(); return p && p.names; }")

    def pills(self):
        return self.page.eval_on_selector_all(".cs-pill", "ps => ps.map(p => [+p.dataset.line, p.textContent])")


@pytest.fixture(scope="module", params=["3", "4"], ids=["gradio3", "gradio4"])
def gradio(request):
    return request.param


class _Session:
    """One browser context per gradio version and theme; each test reloads the page (a fresh editor)."""

    def __init__(self, browser, tokenize, url):
        self.context = browser.new_context(accept_downloads=True, viewport={"width": 900, "height": 900})
        self.url, self.problems, self.calls = url, [], []
        page = self.context.new_page()
        page.set_default_timeout(10000)
        page.on("console", lambda m: self.problems.append(f"{m.type}: {m.text}")
                if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: self.problems.append(f"pageerror: {e}"))

        def refresh(args):
            host = json.loads(args[1])
            self.calls.append((args[0], host))
            return preview_panel({"story": args[0], **SETTINGS}, host["prompt"], host["seed"],
                                 [("CLIP-L", tokenize)])

        page.expose_function("pyRefresh", refresh)
        self.page = Page(page, self.calls)

    def fresh(self) -> Page:
        self.calls.clear()
        self.page.goto(self.url)
        self.page.wait_for_function(f"window.MOUNTED && !!document.querySelector('{STORY}')")
        return self.page


def _session(browser, server, tokenize, gradio, theme):
    return _Session(browser, tokenize, f"{server}/tests/browser/accordion.html?gradio={gradio}&theme={theme}")


@pytest.fixture(scope="module")
def session(browser, server, tokenize, gradio):
    s = _session(browser, server, tokenize, gradio, "light")
    yield s
    s.context.close()


@pytest.fixture
def page(session):
    yield session.fresh()
    problems, session.problems[:] = session.problems[:], []
    assert problems == [], "the page logged errors or warnings"


# --- host contract --------------------------------------------------------------------------------------------------

def test_host_args_replace_only_the_marker(page):
    page.fill("#txt2img_prompt textarea", "watercolor")
    page.fill("#txt2img_seed input", "1234")
    marker = '{"consistent_story_host": true}'
    for args in (["story", marker], ["story", marker, "<div>old preview</div>", 3, None]):
        out = page.evaluate("a => consistentStoryHostArgs('txt2img', a)", args)
        assert len(out) == len(args)
        assert json.loads(out[1]) == {"consistent_story_host": True, "prompt": "watercolor", "seed": "1234"}
        assert out[:1] + out[2:] == args[:1] + args[2:]
    untouched = [' {"consistent_story_host": true}', 'x{"consistent_story_host"', 7]
    assert page.evaluate("a => consistentStoryHostArgs('img2img', a)", untouched) == untouched
    assert page.evaluate("() => JSON.parse(consistentStoryHostArgs('img2img', ['%s'])[0])" %
                         marker.replace('"', '\\"')) == {"consistent_story_host": True, "prompt": "", "seed": -1}


def test_hash_matches_python(page):
    for text in ["", "abc", NAMED, "emoji \U0001f98a and ü\r\n"]:
        assert page.evaluate("t => consistentStoryEditor.hash(t)", text) == story_hash(text)


# --- debounced refresh ----------------------------------------------------------------------------------------------

def test_typing_refreshes_once_after_the_pause(page):
    page.fill("#txt2img_prompt textarea", "style words")  # an empty story at load, then a new prompt: no refresh
    page.wait_for_timeout(1000)
    assert page.evaluate("window.REFRESHES || 0") == 0
    page.click(STORY)
    page.keyboard.type("a red fox\nin the snow", delay=20)
    page.wait_for_function("window.RENDERED === 1")
    page.wait_for_timeout(1000)  # nothing changed since: no second click
    assert page.evaluate("window.REFRESHES") == 1
    assert page.calls == [("a red fox\nin the snow", {"consistent_story_host": True, "prompt": "style words",
                                                      "seed": "-1"})]


def test_polling_catches_programmatic_changes(page):
    page.set_story("a red fox\nin the snow")  # as gradio sets it: no DOM event
    page.refreshed()
    page.eval_on_selector("#txt2img_seed input", "i => { i.value = '77'; }")
    page.wait_for_function("window.RENDERED === 2")
    assert page.calls[-1][1]["seed"] == "77"
    page.wait_for_timeout(1000)
    assert page.evaluate("window.REFRESHES") == 2


# --- per-line token counts ------------------------------------------------------------------------------------------

def _line_top(page, line):
    """The line's top in the textarea's padding box, measured by the browser's own textarea layout."""
    return page.eval_on_selector(STORY, """(t, n) => {
        const c = t.cloneNode(); const cs = getComputedStyle(t);
        c.style.height = '0px'; c.style.width = cs.width; c.value = t.value.split('\\n').slice(0, n - 1).join('\\n');
        t.parentNode.appendChild(c); const h = n === 1 ? parseFloat(cs.paddingTop) :
            c.scrollHeight - parseFloat(cs.paddingBottom); c.remove(); return h; }""", line)


def _pill_boxes(page):
    return page.eval_on_selector(STORY, """t => { const r = t.getBoundingClientRect(), cs = getComputedStyle(t);
        return [...document.querySelectorAll('.cs-pill')].map(p => { const q = p.getBoundingClientRect();
            return {line: +p.dataset.line, top: q.top - r.top - parseFloat(cs.borderTopWidth) + t.scrollTop,
                    left: q.left, right: q.right, boxRight: r.left + t.clientLeft + t.clientWidth,
                    textRight: r.left + t.clientLeft + t.clientWidth - parseFloat(cs.paddingRight)}; }); }""")


def test_pills_show_the_rows_counts_at_their_lines(page):
    long_line = "[Bob] " + "walking through a very long and winding street full of shops " * 3
    story = NAMED + "\n" + long_line + "\n[NC] after the long line\n" + "\n".join(f"[Bob] frame {i}" for i in range(8))
    page.set_story(story)
    page.refreshed()
    rows = page.eval_on_selector_all("tr.cs-frame", "rs => rs.map(r => [+r.dataset.line, r.dataset.count + '/' "
                                                    "+ r.dataset.limit])")
    assert len(rows) == 13 and all(line for line, _ in rows)
    page.wait_for_function("document.querySelectorAll('.cs-pill').length === 13")
    assert page.pills() == rows
    boxes = _pill_boxes(page)
    for box in boxes:
        assert abs(box["top"] - _line_top(page, box["line"])) <= 1.5, box
        assert box["right"] <= box["boxRight"] + 0.5 and box["left"] >= box["textRight"] - 0.5, box
    lh = page.eval_on_selector(STORY, "t => parseFloat(getComputedStyle(t).lineHeight)")
    tops = [b["top"] for b in boxes]
    assert tops == sorted(tops)
    long_no = story.split("\n").index(long_line) + 1
    top_of = {b["line"]: b["top"] for b in boxes}
    gap = top_of[long_no + 1] - top_of[long_no]
    assert gap >= 2 * lh  # the long line wraps: the next pill sits rows below
    page.eval_on_selector(STORY, "t => { t.scrollTop = 60; }")
    page.wait_for_function("() => { const p = document.querySelector('.cs-pill'); return p && "
                           "Math.abs(parseFloat(p.style.top) - (%f - 60)) < 1.5; }" % _line_top(page, 5))
    for box in _pill_boxes(page):
        assert abs(box["top"] - _line_top(page, box["line"])) <= 1.5, box
    assert page.eval_on_selector(".cs-pills", "l => getComputedStyle(l).pointerEvents") == "none"
    page.wait_for_timeout(500)  # the host's update callbacks run 200 ms after the last DOM change (the scroll's)
    after = page.evaluate("AFTER_UPDATES")
    page.wait_for_timeout(800)  # the editor's own DOM writes do not keep the host's update callbacks running
    assert page.evaluate("AFTER_UPDATES") == after


def test_pills_hidden_while_stale_and_red_when_over(page):
    page.set_story(NAMED)
    page.refreshed()
    page.wait_for_function("document.querySelectorAll('.cs-pill').length === 3")
    page.keyboard.type("!")
    assert page.pills() == []  # the counts belong to the old text
    page.refreshed()
    page.wait_for_function("document.querySelectorAll('.cs-pill').length === 3")
    text = "a fox\nsitting"
    page.set_story(text)
    page.refreshed()
    page.eval_on_selector(f"#{P}preview .prose", """(d, h) => { d.innerHTML = '<div class="cs-preview" ' +
        'data-story-hash="' + h + '"><table><tr class="cs-frame" data-frame="1" data-line="2" data-count="80" ' +
        'data-limit="75"><td>1</td></tr></table></div>'; }""", story_hash(text))
    page.wait_for_function("document.querySelector('.cs-pill.cs-over')")
    assert page.pills() == [[2, "80/75"]]
    color = page.eval_on_selector(".cs-pill", "p => getComputedStyle(p).borderTopColor")
    r, g, b = (int(x) for x in re.findall(r"\d+", color)[:3])
    assert r > 200 and g < 60 and b < 60


# --- [ completion ---------------------------------------------------------------------------------------------------

def test_completion_lists_filters_and_accepts(page):
    page.set_story(NAMED + "\n")
    page.keyboard.type("[")
    assert page.popup() == ["Bob", "Alice Smith", "NC"]
    page.keyboard.type("a")
    assert page.popup() == ["Alice Smith"]
    page.keyboard.press("Enter")
    assert page.popup() is None and page.story() == NAMED + "\n[Alice Smith] "
    page.keyboard.type("in the park\n[")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Tab")
    assert page.story().endswith("in the park\n[Alice Smith] ")
    page.keyboard.type("[b")
    page.click(".cs-complete-item")
    assert page.story().endswith("[Alice Smith] [Bob] ")
    assert page.evaluate("document.querySelectorAll('.cs-complete').length") == 0
    before = page.story()
    page.keyboard.type("[n")
    page.keyboard.press("Enter")
    assert page.story() == before + "[NC] "
    page.keyboard.press("Control+z")
    assert page.story() == before + "[n"


def test_completion_closes(page):
    page.set_story(NAMED + "\n")
    page.keyboard.type("[")
    page.keyboard.press("Escape")
    assert page.popup() is None and page.evaluate("HOST_KEYS") == []  # Esc did not reach the host
    page.keyboard.press("Escape")
    assert page.evaluate("HOST_KEYS") == ["interrupt"]  # without the popup it does
    for keys in (["]"], [","], ["Backspace"], ["ArrowLeft"], ["ArrowDown"]):
        page.set_story(NAMED + "\n[Bob] x ")
        page.keyboard.type("[")
        assert page.popup() == ["Bob", "Alice Smith", "NC"]
        if keys == ["ArrowDown"]:
            page.keyboard.press("ArrowDown")  # moves the highlight, not the caret
            assert page.evaluate("consistentStoryEditor.popup().index") == 1
            page.keyboard.press("ArrowLeft")
        else:
            page.keyboard.press(keys[0])
        assert page.popup() is None, keys
    page.keyboard.type("[")
    page.click("#txt2img_prompt textarea")  # blur
    assert page.popup() is None
    assert page.evaluate("document.querySelectorAll('.cs-complete').length") == 0


def test_ctrl_enter_reaches_the_host(page):
    page.set_story(NAMED + "\n")
    page.keyboard.press("Control+Enter")
    page.keyboard.type("[")
    page.keyboard.press("Control+Enter")
    assert page.popup() is None
    assert page.evaluate("HOST_KEYS") == ["generate", "generate"]
    assert page.story() == NAMED + "\n["


def test_completion_only_where_tags_go(page):
    for text, caret, expected in [
        ("a red fox\n", None, ["NC"]),                    # shorthand: only [NC]
        ("a red fox", None, None),                         # the identity line
        ('{"frames": ["', None, None),                     # JSON form
        (NAMED, 3, None),                                  # a description line
        ("Bob: a man\n// Al: no\n---\n// x ", None, None),  # a comment line
        (NAMED + "\n[Bob] x # a caption ", None, None),    # caption text
    ]:
        page.set_story(text, caret)
        page.keyboard.type("[")
        assert page.popup() == expected, text


# --- Alt+ArrowUp/Down -----------------------------------------------------------------------------------------------

def test_move_lines(page):
    page.evaluate("window.addEventListener('keydown', e => { window.PREVENTED = e.defaultPrevented; })")
    page.set_story("a\nbb\nccc\nd", 3)  # caret inside "bb"
    page.keyboard.press("Alt+ArrowDown")
    assert page.story() == "a\nccc\nbb\nd" and page.selection() == [7, 7]
    page.keyboard.press("Alt+ArrowDown")
    assert page.story() == "a\nccc\nd\nbb"
    page.keyboard.press("Alt+ArrowDown")  # last line: no-op, but no page scroll either
    assert page.story() == "a\nccc\nd\nbb" and page.evaluate("PREVENTED") is True
    page.keyboard.press("Control+z")
    page.keyboard.press("Control+z")
    assert page.story() == "a\nbb\nccc\nd"
    page.eval_on_selector(STORY, "t => t.setSelectionRange(3, 6)")  # "b\ncc": touches lines 2 and 3
    page.keyboard.press("Alt+ArrowUp")
    assert page.story() == "bb\nccc\na\nd" and page.selection() == [1, 4]
    assert page.eval_on_selector(STORY, "t => t.value.slice(t.selectionStart, t.selectionEnd)") == "b\nc"
    page.keyboard.press("Alt+ArrowUp")
    assert page.story() == "bb\nccc\na\nd" and page.evaluate("PREVENTED") is True
    page.eval_on_selector(STORY, "t => t.setSelectionRange(0, 7)")  # "bb\nccc\n": ends at line 3's start
    page.keyboard.press("Alt+ArrowDown")
    assert page.story() == "a\nbb\nccc\nd" and page.selection() == [2, 9]
    page.keyboard.press("Control+z")
    assert page.story() == "bb\nccc\na\nd"


# --- preview rows -> story lines ------------------------------------------------------------------------------------

def test_row_and_error_clicks_select_the_line(page):
    story = NAMED + "\n" + "\n".join(f"[Bob] frame {i}" for i in range(25))
    lines = story.split("\n")
    page.set_story(story, 0)
    page.refreshed()
    page.click(f'tr.cs-frame[data-line="{len(lines)}"]')
    start = len("\n".join(lines[:-1])) + 1
    assert page.selection() == [start, len(story)]
    assert page.evaluate("document.activeElement === document.querySelector('%s')" % STORY)
    top = _line_top(page, len(lines))
    scroll, height = page.eval_on_selector(STORY, "t => [t.scrollTop, t.clientHeight]")
    assert scroll > 0 and scroll <= top and top + 20 <= scroll + height
    page.click('tr.cs-frame[data-line="7"]')
    start = len("\n".join(lines[:6])) + 1
    assert page.selection() == [start, start + len(lines[6])]
    assert page.eval_on_selector_all(".cs-selected", "s => s.map(r => r.dataset.line)") == ["7"]
    bad = NAMED + "\n[Zed] who"
    page.set_story(bad)
    page.refreshed()
    page.click(".cs-error[data-line]")
    start = len(NAMED) + 1
    assert page.selection() == [start, len(bad)]


# --- load / save ----------------------------------------------------------------------------------------------------

def _load(page, name, data: bytes):
    with page.expect_file_chooser() as chooser:
        page.click(f"#{P}load")
    chooser.value.set_files({"name": name, "mimeType": "application/octet-stream", "buffer": data})
    page.wait_for_function("(n) => { const s = document.querySelector('.cs-file-status'); "
                           "return s && s.textContent.includes(n); }", arg=name)
    return page.eval_on_selector(".cs-file-status", "s => [s.textContent, s.classList.contains('cs-error'), "
                                                    "s.getAttribute('role'), s.previousElementSibling.id]")


def test_load_and_save(page):
    page.set_story("old text")
    crlf = "\ufeff" + NAMED.replace("\n", "\r\n")  # a BOM and Windows line ends: the text as the box holds it
    assert _load(page, "mine.txt", crlf.encode()) == ["Loaded mine.txt", False, "status", P + "save"]
    assert page.story() == NAMED
    page.keyboard.press("Control+z")
    assert page.story() == "old text"
    data = json.dumps({"identity": "a red fox", "frames": [{"prompt": "in the snow"}]})
    assert _load(page, "fox.JSON", data.encode())[0] == "Loaded fox.JSON"
    assert page.story() == data
    page.refreshed()  # a loaded story reaches the server like typed text
    assert page.calls[-1][0] == data
    with page.expect_download() as download:
        page.click(f"#{P}save")
    assert download.value.suggested_filename == "story.json"
    assert pathlib.Path(download.value.path()).read_text(encoding="utf-8") == data
    page.set_story("a fox ü\nsitting")
    with page.expect_download() as download:
        page.click(f"#{P}save")
    assert download.value.suggested_filename == "story.txt"
    assert pathlib.Path(download.value.path()).read_text(encoding="utf-8") == "a fox ü\nsitting"
    assert page.text_content(".cs-file-status") == "Saved story.txt"
    assert page.evaluate("document.querySelectorAll('.cs-file-status').length") == 1


def test_load_refusals(page):
    page.set_story("keep me")
    for name, data, message in [
        ("story.md", b"a fox", "story.md: not a .txt or .json file"),
        ("bad.json", b'{"frames": [', "bad.json: invalid JSON: "),
        ("list.json", b'["a"]', "list.json: the JSON is not an object"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), "latin1.txt: not UTF-8 text"),
        ("huge.txt", b"a" * (1024 * 1024 + 1), "huge.txt: larger than 1 MiB"),
    ]:
        text, error, _, _ = _load(page, name, data)
        assert text.startswith(message) and error, text
        assert page.story() == "keep me"
        if name == "bad.json":
            assert len(text) > len(message)  # JSON.parse's own message follows


# --- themes ---------------------------------------------------------------------------------------------------------

def _luminance(css: str) -> float:
    r, g, b = (int(x) / 255 for x in re.findall(r"[\d.]+", css)[:3])
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def _contrast(fg: str, bg: str) -> float:
    a, b = sorted((_luminance(fg), _luminance(bg)), reverse=True)
    return (a + 0.05) / (b + 0.05)


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_popup_and_pills_readable(browser, server, tokenize, gradio, theme):
    session = _session(browser, server, tokenize, gradio, theme)
    try:
        page = session.fresh()
        page.set_story(NAMED + "\n")
        page.refreshed()
        page.wait_for_function("document.querySelectorAll('.cs-pill').length === 3")
        pill = page.eval_on_selector(".cs-pill", "p => [getComputedStyle(p).color, "
                                                 "getComputedStyle(p).backgroundColor]")
        page.keyboard.type("[")
        page.wait_for_selector(".cs-complete")
        pairs = page.evaluate("""() => {
            const s = (q) => getComputedStyle(document.querySelector(q));
            const pop = s('.cs-complete'), act = s('.cs-complete-item.cs-active'),
                  item = s('.cs-complete-item:not(.cs-active)');
            return [[item.color, pop.backgroundColor], [act.color, act.backgroundColor], [pop.zIndex]]; }""")
        pairs.insert(2, pill)
        for fg, bg in pairs[:3]:
            assert "rgba(0, 0, 0, 0)" not in (fg, bg)
            assert _contrast(fg, bg) >= 4.5, (theme, fg, bg)
        assert int(pairs[3][0]) >= 1000
        dark_bg = _luminance(pairs[0][1]) < 0.2
        assert dark_bg == (theme == "dark")
    finally:
        session.context.close()
    assert session.problems == []


# --- the preview's width --------------------------------------------------------------------------------------------

LONG_WORDS = ("Bartholomew_Featherstonehaugh_3r: a_knight_whose_armour_description_has_no_spaces_at_all_anywhere\n"
              "Alexandra Konstantinopoulou: a woman with very long silver hair and a green cloak with golden stars\n"
              "---\n[Bartholomew_Featherstonehaugh_3r] [Alexandra Konstantinopoulou] walk along the beach at dawn "
              "# A_caption_without_a_single_space_to_break_the_line_anywhere\n"
              "[Alexandra Konstantinopoulou] reads supercalifragilisticexpialidocious_antidisestablishmentarianism\n"
              "[NC] gulls over the waves")


@pytest.mark.parametrize("theme", ["light", "dark"])
@pytest.mark.parametrize("width", [470, 640])
def test_preview_table_fits_the_accordion(browser, server, tokenize, gradio, theme, width):
    """Long unbroken names, descriptions and captions wrap inside the accordion (470 px: a 444 px preview block,
    what A1111 gives it in a 1024 px window; 640 px: a 1366 px one); the table never reaches past its right edge."""
    session = _session(browser, server, tokenize, gradio, theme)
    try:
        page = session.fresh()
        page.eval_on_selector(".gradio-container", "(n, w) => { n.style.width = w + 'px'; }", width)
        page.set_story(LONG_WORDS)
        page.refreshed()
        edges = page.evaluate("""(p) => {
            const right = (q) => document.querySelector(q).getBoundingClientRect().right;
            const box = document.querySelector('#' + p + 'preview .cs-table');
            return {accordion: right('#accordion'), block: right('#' + p + 'preview'), box: right('#' + p +
                'preview .cs-table'), table: right('#' + p + 'preview table'), columns:
                document.querySelectorAll('#' + p + 'preview th').length, scroll: box.scrollWidth - box.clientWidth};
            }""", P)
        assert edges["columns"] == 7, edges
        assert edges["box"] <= edges["block"] <= edges["accordion"], edges
        assert edges["table"] <= edges["box"] and edges["scroll"] == 0, edges  # wrapped, not scrolled
    finally:
        session.context.close()
    assert session.problems == []
