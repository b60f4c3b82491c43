// Consistent Story: the story editor (debounced preview refresh, [ completion, per-line token counts, Alt+Up/Down
// line moves, preview row selection, load/save). Host contracts (A1111 1.10 / gradio 3.41, Forge / gradio 4.40):
// - extension scripts are classic <script>s loaded after the host's script.js, which defines gradioApp(),
//   onUiLoaded(), onAfterUiUpdate() and updateInput(); every use below tolerates their absence;
// - elements: #script_<tab>_consistent_story_{story,preview,refresh,load,save} (story: a Textbox block whose
//   <textarea> is a descendant; refresh: a hidden Button kept in the DOM), #<tab>_prompt textarea, #<tab>_seed input;
// - gradio 3.41 gives the HTML block's inner div the same id as the block, so ids are matched with closest()/regex;
// - gradio 4 mounts the content of closed accordions late: everything is found lazily and attached idempotently;
// - gradio sets values without DOM events (infotext paste, "Send to", server outputs): values are also polled;
// - the host's document keydown listener (Ctrl/Cmd+Enter generate, Esc interrupt) must keep receiving its keys.
// The preview HTML comes from lib_consistency/story/preview.py (data-story-hash, tr.cs-frame[data-line]...).
(function() {
    "use strict";
    const api = window.consistentStoryEditor = window.consistentStoryEditor || {};  // story_editor_files.js adds to it
    if (api.POLL_MS) return;
    const ID = /^script_(\w+?)_consistent_story_(story|preview|refresh|load|save)$/;
    const TABS = ["txt2img", "img2img"];
    const POLL_MS = 500, STABLE_MS = 400;
    const NAME = /^\p{L}[\p{L}\p{M}\p{N}_\- ]*$/u, NAME_CHARS = /^[\p{L}\p{M}\p{N}_\- ]*$/u;
    Object.assign(api, {POLL_MS, STABLE_MS, clicks: 0});
    const tabs = {};  // tab -> refresh state (see state())
    let popup = null, editing = false;

    function root() {
        const app = typeof gradioApp === "function" ? gradioApp() : null;
        return app && app.querySelector ? app : document;
    }
    function el(tab, part) {
        const id = "script_" + tab + "_consistent_story_" + part;
        return root().querySelector("#" + id) || document.getElementById(id);
    }
    api.el = (tab, part) => el(tab, part);
    api.storyBox = (tab) => storyBox(tab);
    function storyBox(tab) {
        const block = el(tab, "story");
        return block ? (block.matches("textarea") ? block : block.querySelector("textarea")) : null;
    }
    function hostValue(tab, part, fallback) {
        const box = root().querySelector("#" + tab + "_" + part);
        const input = box && (box.matches("input, textarea") ? box : box.querySelector("textarea, input"));
        return input ? input.value : fallback;
    }
    function tabOf(node) {
        for (let n = node; n && n.nodeType === 1; n = n.parentElement) {
            const m = n.id && ID.exec(n.id);
            if (m) return {tab: m[1], part: m[2]};
        }
        return null;
    }
    function storyTab(node) {  // the tab whose story textarea `node` is, or null
        const t = node && node.tagName === "TEXTAREA" ? tabOf(node) : null;
        return t && t.part === "story" ? t.tab : null;
    }
    function visible(node) {
        return !!node && node.getClientRects().length > 0;
    }
    function hash(text) {  // story_hash(): 32-bit FNV-1a over UTF-16 code units, 8 lowercase hex digits
        let h = 0x811c9dc5;
        for (let i = 0; i < text.length; i++) h = Math.imul(h ^ text.charCodeAt(i), 0x01000193) >>> 0;
        return h.toString(16).padStart(8, "0");
    }
    api.hash = hash;

    // The refresh button's _js: the marker argument becomes the host's prompt and seed (inputs or inputs+outputs).
    window.consistentStoryHostArgs = function(tab, args) {
        return Array.from(args || [], (a) => typeof a === "string" && a.startsWith('{"consistent_story_host"') ?
            JSON.stringify({consistent_story_host: true, prompt: hostValue(tab, "prompt", ""),
                seed: hostValue(tab, "seed", -1)}) : a);
    };

    // Text edits as one undo step: execCommand keeps the textarea's native undo stack (Ctrl+Z).
    function replaceRange(box, start, end, text, selStart, selEnd) {
        text = text.replace(/\r\n?/g, "\n");  // what a textarea's value holds
        const expected = box.value.slice(0, start) + text + box.value.slice(end);
        if (expected === box.value) return;
        editing = true;
        try {
            box.focus();
            box.setSelectionRange(start, end);
            document.execCommand(text ? "insertText" : "delete", false, text);
            if (box.value !== expected) {  // execCommand unavailable: no native undo step, but the same text
                box.value = expected;
                box.setSelectionRange(start + text.length, start + text.length);
                if (typeof updateInput === "function") updateInput(box);
                else box.dispatchEvent(new Event("input", {bubbles: true}));
            }
        } finally {
            editing = false;
        }
        if (selStart !== undefined) box.setSelectionRange(selStart, selEnd === undefined ? selStart : selEnd);
    }
    api.replaceRange = replaceRange;

    // --- 1. debounced preview refresh ------------------------------------------------------------------------
    function state(tab) {
        // seen: the values a pending timer waits on; clicked: the values of the last click; story: its story text
        return tabs[tab] || (tabs[tab] = {seen: null, clicked: null, story: "", timer: 0});
    }
    function values(tab) {
        const box = storyBox(tab);
        return box ? [box.value, hostValue(tab, "prompt", ""), String(hostValue(tab, "seed", -1))] : null;
    }
    function schedule(tab) {
        const s = state(tab);
        clearTimeout(s.timer);
        s.seen = JSON.stringify(values(tab));
        s.timer = setTimeout(() => fire(tab), STABLE_MS);
    }
    function fire(tab) {
        const s = state(tab), now = values(tab);
        const key = JSON.stringify(now);
        if (!now) return;
        if (key !== s.seen) return schedule(tab);  // changed meanwhile (polled value): wait for stability again
        if (key === s.clicked || (!now[0] && !s.story)) return;
        const button = el(tab, "refresh");
        if (!button || !visible(storyBox(tab))) {  // a closed accordion: the poll reschedules once it is open
            s.seen = null;
            return;
        }
        s.clicked = key;
        s.story = now[0];
        api.clicks++;
        button.click();
    }
    function poll() {  // also the fallback attachment: it needs none of the host's callbacks
        ensureStyle();
        for (const tab of TABS) {
            const box = storyBox(tab);
            if (!visible(box)) continue;
            attachBox(tab, box);
            const s = state(tab), key = JSON.stringify(values(tab));
            if (key !== s.seen && key !== s.clicked) schedule(tab);
            renderPills(tab);
        }
    }

    // --- 2. [ completion ---------------------------------------------------------------------------------------
    function storyNames(text, caret) {  // null: no completion at the caret; else the tag names offered there
        if (text.trimStart().startsWith("{")) return null;
        const lines = text.split("\n"), at = text.slice(0, caret).split("\n").length - 1;
        const live = (s) => s.trim() && !s.trim().startsWith("//");
        const sep = lines.findIndex((s) => live(s) && s.trim() === "---");
        if (!live(lines[at]) && lines[at].trim()) return null;
        if (sep < 0) {
            const first = lines.findIndex(live);
            return first >= 0 && at > first ? ["NC"] : null;
        }
        if (at <= sep) return null;
        const names = [];
        for (const line of lines.slice(0, sep)) {
            if (!live(line) || line.indexOf(":") < 0) continue;
            const name = line.slice(0, line.indexOf(":")).trim().split(/\s+/).join(" ");
            if (NAME.test(name) && name.length <= 32 && name.toUpperCase() !== "NC" &&
                !names.some((n) => n.toLowerCase() === name.toLowerCase())) names.push(name);
        }
        return names.concat(["NC"]);
    }
    api.storyNames = storyNames;

    function popupHost() {
        const app = root();
        return app.nodeType === 1 ? app : document.body;
    }
    function openPopup(tab, box) {
        const caret = box.selectionStart;
        const line = box.value.slice(box.value.lastIndexOf("\n", caret - 1) + 1, caret);
        if (line.indexOf(" # ") >= 0) return;  // caption text: tags there are caption words
        const names = storyNames(box.value, caret);
        if (!names) return;
        closePopup();
        const node = document.createElement("div");
        node.className = "cs-complete";
        node.setAttribute("role", "listbox");
        node.addEventListener("mousedown", (e) => e.preventDefault());  // keep the textarea's focus and caret
        node.addEventListener("click", (e) => {
            const item = e.target.closest(".cs-complete-item");
            if (item && popup) accept(+item.dataset.index);
        });
        popup = {tab, box, bracket: caret - 1, names, shown: [], index: 0, node};
        popupHost().appendChild(node);
        updatePopup();
    }
    function closePopup() {
        if (popup) popup.node.remove();
        popup = null;
    }
    function updatePopup() {
        const p = popup, box = p.box, caret = box.selectionStart;
        const prefix = box.value.slice(p.bracket + 1, caret);
        if (!box.isConnected || document.activeElement !== box && box.getRootNode().activeElement !== box ||
            caret !== box.selectionEnd || caret <= p.bracket || box.value[p.bracket] !== "[" ||
            !NAME_CHARS.test(prefix) || /^[^\p{L}]/u.test(prefix)) return closePopup();
        const shown = p.names.filter((n) => n.toLowerCase().startsWith(prefix.toLowerCase()));
        if (!shown.length) return closePopup();
        if (shown.join("\n") !== p.shown.join("\n")) p.index = 0;
        p.shown = shown;
        p.node.textContent = "";
        shown.forEach((name, i) => {
            const item = document.createElement("div");
            item.className = "cs-complete-item" + (i === p.index ? " cs-active" : "");
            item.setAttribute("role", "option");
            item.setAttribute("aria-selected", String(i === p.index));
            item.dataset.index = String(i);
            item.textContent = name;
            p.node.appendChild(item);
        });
        const at = caretPoint(box, p.bracket);
        p.node.style.left = Math.round(at.left) + "px";
        p.node.style.top = Math.round(at.bottom + 2) + "px";
    }
    function accept(index) {
        const p = popup, name = p.shown[index], box = p.box, caret = box.selectionStart;
        closePopup();
        const next = box.value.charAt(caret);
        const text = name + "]" + (next && /\s/.test(next) ? "" : " ");
        replaceRange(box, p.bracket + 1, caret, text);
    }
    api.popup = () => popup && {names: popup.shown.slice(), index: popup.index, node: popup.node};

    // --- mirror: where each line (and the caret) sits in a textarea ---------------------------------------------
    const COPIED = ["fontFamily", "fontSize", "fontWeight", "fontStyle", "letterSpacing", "lineHeight", "textTransform",
        "wordSpacing", "textIndent", "tabSize", "paddingTop", "paddingLeft", "paddingRight", "fontVariant"];
    let mirrorNode = null;
    function mirror(box) {
        if (!mirrorNode) {  // inside a 0x0 clipping box, so a tall mirror never extends the page
            const clip = document.createElement("div");
            clip.setAttribute("aria-hidden", "true");
            clip.style.cssText = "position:absolute;top:0;left:0;width:0;height:0;overflow:hidden;visibility:hidden";
            mirrorNode = clip.appendChild(document.createElement("div"));
            mirrorNode.className = "cs-mirror";
            mirrorNode.style.cssText = "position:absolute;top:0;left:0;white-space:pre-wrap;overflow-wrap:break-word;" +
                "word-wrap:break-word;box-sizing:content-box;border:0;height:auto";
        }
        // outside <body>: the hosts' MutationObservers (onAfterUiUpdate) watch the app, not this scratch element
        const clip = mirrorNode.parentNode;
        if (clip.parentNode !== document.documentElement) document.documentElement.appendChild(clip);
        const cs = getComputedStyle(box), m = mirrorNode;
        COPIED.forEach((p) => { m.style[p] = cs[p]; });
        const inner = box.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
        m.style.width = Math.max(0, inner) + "px";
        return m;
    }
    function lineHeight(box) {
        const cs = getComputedStyle(box), lh = parseFloat(cs.lineHeight);
        return isNaN(lh) ? parseFloat(cs.fontSize) * 1.2 : lh;
    }
    function lineTops(box) {  // top (px, in the textarea's content coordinates) of each line's first visual row
        const m = mirror(box);
        m.textContent = "";
        const rows = box.value.split("\n").map((line) => {
            const row = document.createElement("div");
            row.textContent = line || "\u200b";
            m.appendChild(row);
            return row;
        });
        return rows.map((r) => r.offsetTop);
    }
    api.lineTops = lineTops;
    function caretPoint(box, index) {  // viewport point of the character at `index`
        const m = mirror(box);
        m.textContent = box.value.slice(0, index);
        const mark = document.createElement("span");
        mark.textContent = "\u200b";
        m.appendChild(mark);
        const r = box.getBoundingClientRect(), cs = getComputedStyle(box);
        const left = r.left + parseFloat(cs.borderLeftWidth) + mark.offsetLeft - box.scrollLeft;
        const top = r.top + parseFloat(cs.borderTopWidth) + mark.offsetTop - box.scrollTop;
        return {left, top, bottom: top + lineHeight(box)};
    }

    // --- 3. per-line token counts ---------------------------------------------------------------------------
    const observed = new WeakSet();
    let resizes = null;
    function attachBox(tab, box) {
        if (observed.has(box)) return;
        observed.add(box);
        box.classList.add("cs-story-box");
        if (typeof ResizeObserver === "function") {
            resizes = resizes || new ResizeObserver((entries) => entries.forEach((e) => {
                const t = storyTab(e.target);
                if (t) renderPills(t);
            }));
            resizes.observe(box);
        }
    }
    function renderPills(tab) {  // writes to the DOM only when something changed (hosts observe DOM mutations)
        const box = storyBox(tab);
        if (!box || !box.parentNode) return;
        const preview = el(tab, "preview"), panel = preview && preview.querySelector(".cs-preview");
        const current = hash(box.value), their = panel ? panel.getAttribute("data-story-hash") : "";
        const rows = panel && their === current && visible(box) && box.offsetParent ?
            panel.querySelectorAll("tr.cs-frame[data-line][data-count][data-limit]") : [];
        const pills = [];
        let frame = "";
        if (rows.length) {
            const cs = getComputedStyle(box), tops = lineTops(box), lh = lineHeight(box);
            frame = [box.offsetLeft + parseFloat(cs.borderLeftWidth), box.offsetTop + parseFloat(cs.borderTopWidth),
                box.clientWidth, box.clientHeight, lh].join(",");
            for (const row of rows) {
                const line = +row.getAttribute("data-line"), count = +row.getAttribute("data-count");
                const limit = +row.getAttribute("data-limit");
                if (line >= 1 && line <= tops.length) pills.push([line, count, limit, tops[line - 1] - box.scrollTop]);
            }
        }
        let layer = box.parentNode.querySelector(":scope > .cs-pills");
        const sig = frame + "|" + JSON.stringify(pills);
        if (layer ? layer.dataset.sig === sig : !pills.length) return;
        if (!layer) {
            layer = document.createElement("div");
            layer.className = "cs-pills";
            layer.setAttribute("aria-hidden", "true");
            box.insertAdjacentElement("afterend", layer);
        }
        layer.dataset.sig = sig;
        layer.textContent = "";
        if (!pills.length) return;
        const [left, top, width, height, lh] = frame.split(",");
        Object.assign(layer.style, {left: left + "px", top: top + "px", width: width + "px", height: height + "px"});
        for (const [line, count, limit, y] of pills) {
            const pill = document.createElement("span");
            pill.className = "cs-pill" + (count > limit ? " cs-over" : "");
            pill.dataset.line = String(line);
            pill.textContent = count + "/" + limit;
            Object.assign(pill.style, {top: y + "px", height: lh + "px"});
            layer.appendChild(pill);
        }
    }
    api.renderPills = renderPills;

    // --- 4. Alt+ArrowUp/Down: move the lines the selection touches ----------------------------------------------
    function moveLines(box, down) {
        const v = box.value, a = box.selectionStart, b = box.selectionEnd;
        const start = v.lastIndexOf("\n", a - 1) + 1;
        const last = b > a && v[b - 1] === "\n" ? b - 1 : b;  // a selection ending at a line start leaves that line
        let end = v.indexOf("\n", last);
        if (end < 0) end = v.length;
        const block = v.slice(start, end);
        if (!down) {
            if (start === 0) return;
            const prev = v.lastIndexOf("\n", start - 2) + 1, other = v.slice(prev, start - 1);
            replaceRange(box, prev, end, block + "\n" + other, a - other.length - 1, b - other.length - 1);
        } else {
            if (end === v.length) return;
            let next = v.indexOf("\n", end + 1);
            if (next < 0) next = v.length;
            const other = v.slice(end + 1, next);
            replaceRange(box, start, next, other + "\n" + block, a + other.length + 1, b + other.length + 1);
        }
    }
    api.moveLines = moveLines;

    // --- 5. preview row -> story line ---------------------------------------------------------------------------
    function selectLine(tab, number) {
        const box = storyBox(tab);
        if (!box) return false;
        const lines = box.value.split("\n");
        if (!(number >= 1 && number <= lines.length)) return false;
        const start = lines.slice(0, number - 1).reduce((n, s) => n + s.length + 1, 0);
        box.focus();
        box.setSelectionRange(start, start + lines[number - 1].length);
        const top = lineTops(box)[number - 1], lh = lineHeight(box);
        const pad = parseFloat(getComputedStyle(box).paddingTop);
        if (top < box.scrollTop || top + lh + pad > box.scrollTop + box.clientHeight) {
            box.scrollTop = Math.max(0, top - box.clientHeight / 3);
        }
        renderPills(tab);
        return true;
    }
    api.selectLine = selectLine;

    // --- event delegation (document; the first composed path entry is the real target) -------------------------
    function target(e) {
        return e.composedPath ? e.composedPath()[0] : e.target;
    }
    document.addEventListener("keydown", (e) => {
        const node = target(e), tab = storyTab(node);
        if (!tab) return;
        if (popup && popup.box === node) {
            const k = e.key;
            if ((e.ctrlKey || e.metaKey) && k === "Enter") return closePopup();  // the host's generate still runs
            if (k === "Escape") {
                e.preventDefault();
                e.stopPropagation();  // the host's Esc (interrupt) is not for us while the list is open
                return closePopup();
            }
            if (/^(ArrowLeft|ArrowRight|Home|End|PageUp|PageDown)$/.test(k)) closePopup();  // the caret moves away
            else if (!e.ctrlKey && !e.metaKey && !e.altKey) {
                if (k === "ArrowDown" || k === "ArrowUp") {
                    e.preventDefault();
                    const n = popup.shown.length;
                    popup.index = (popup.index + (k === "ArrowDown" ? 1 : n - 1)) % n;
                    return updatePopup();
                }
                if (k === "Enter" || k === "Tab") {
                    e.preventDefault();
                    return accept(popup.index);
                }
            }
        }
        if (e.altKey && !e.ctrlKey && !e.metaKey && !e.shiftKey && (e.key === "ArrowUp" || e.key === "ArrowDown")) {
            e.preventDefault();
            closePopup();
            moveLines(node, e.key === "ArrowDown");
        }
    }, true);
    document.addEventListener("input", (e) => {
        const node = target(e), tab = storyTab(node);
        const part = node && node.closest && node.closest("[id]");
        if (tab) {
            if (popup && popup.box === node) updatePopup();
            else if (!editing && e.inputType === "insertText" && e.data === "[") openPopup(tab, node);
            attachBox(tab, node);
            renderPills(tab);
            schedule(tab);
        } else if (part) {
            const m = /^(\w+?)_(prompt|seed)$/.exec(part.id);
            if (m && TABS.indexOf(m[1]) >= 0) schedule(m[1]);
        }
    }, true);
    // capture: Chromium fires a textarea's selectionchange at the textarea, where it does not bubble to document
    document.addEventListener("selectionchange", () => { if (popup) updatePopup(); }, true);
    document.addEventListener("focusout", (e) => { if (popup && target(e) === popup.box) closePopup(); }, true);
    document.addEventListener("scroll", (e) => {
        const tab = storyTab(target(e));
        if (tab) renderPills(tab);
        if (popup) updatePopup();
    }, true);
    window.addEventListener("resize", () => TABS.forEach(renderPills));
    document.addEventListener("click", (e) => {
        if (popup && target(e) === popup.box) updatePopup();
        const node = target(e), hit = node && node.closest && node.closest("button, tr.cs-frame, .cs-error");
        const where = hit && tabOf(hit);
        if (!where) return;
        if (hit.tagName === "BUTTON" && where.part === "load" && api.load) api.load(where.tab);
        else if (hit.tagName === "BUTTON" && where.part === "save" && api.save) api.save(where.tab);
        else if (where.part === "preview" && hit.hasAttribute("data-line") &&
                 selectLine(where.tab, +hit.getAttribute("data-line"))) {
            const panel = hit.closest(".cs-preview") || hit.parentNode;
            panel.querySelectorAll(".cs-selected").forEach((n) => n.classList.remove("cs-selected"));
            hit.classList.add("cs-selected");
        }
    });

    // --- styles and attachment ----------------------------------------------------------------------------------
    const CSS = `
.cs-story-box{padding-right:calc(var(--input-padding, 10px) + 5.5em) !important}
.cs-pills{position:absolute;pointer-events:none;overflow:hidden;z-index:5}
.cs-pill{position:absolute;right:0.5em;display:flex;align-items:center;pointer-events:none;white-space:nowrap}
.cs-pill{font-size:0.8em;padding:0 0.5em;box-sizing:border-box;
  color:var(--body-text-color,#1f2937);background:var(--input-background-fill,#fff);
  border:2px solid rgba(192,192,192,0.4);border-radius:0.4em}
.cs-pill.cs-over{border-color:rgba(255,0,0,0.6)}
.cs-complete{position:fixed;z-index:10000;min-width:8em;max-height:14em;overflow:auto;padding:2px 0;
  background:var(--background-fill-primary,#fff);color:var(--body-text-color,#1f2937);
  border:1px solid var(--border-color-primary,#d1d5db);border-radius:6px;box-shadow:0 4px 12px rgba(0,0,0,0.25);
  font-size:var(--text-md,14px)}
.cs-complete-item{padding:2px 10px;cursor:pointer;white-space:nowrap}
.cs-complete-item.cs-active{background:var(--color-accent-soft,#ffedd5);color:var(--body-text-color,#1f2937);
  box-shadow:inset 3px 0 0 var(--color-accent,#f97316)}
.cs-file-status{margin-left:0.75em;align-self:center;font-size:var(--text-sm,0.875rem);color:var(--body-text-color)}
.cs-file-status.cs-error{color:var(--error-text-color,#dc2626)}`;
    function ensureStyle() {
        if (!document.getElementById("cs-story-editor-style") && document.head) {
            const style = document.createElement("style");
            style.id = "cs-story-editor-style";
            style.textContent = CSS;
            document.head.appendChild(style);
        }
    }
    function attach() {
        ensureStyle();
        for (const tab of TABS) {
            const box = storyBox(tab);
            if (box) {
                attachBox(tab, box);
                renderPills(tab);
            }
        }
    }
    api.attach = attach;
    setInterval(poll, POLL_MS);
    if (typeof onUiLoaded === "function") onUiLoaded(attach);
    if (typeof onAfterUiUpdate === "function") {
        onAfterUiUpdate(attach);
    } else {
        const start = () => {
            attach();
            let queued = false;
            new MutationObserver(() => {
                if (queued) return;
                queued = true;
                requestAnimationFrame(() => { queued = false; attach(); });
            }).observe(document.body, {childList: true, subtree: true});
        };
        if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
        else start();
    }
})();
