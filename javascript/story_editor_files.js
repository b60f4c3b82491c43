// Consistent Story: the story editor's Load and Save buttons (#script_<tab>_consistent_story_{load,save}: gradio
// Buttons with no server event; story_editor.js delegates their clicks to consistentStoryEditor.load/save, so the
// two files may load in either order). A loaded file replaces the story as one undoable edit; messages go in a
// status element created once right after the save button.
(function() {
    "use strict";
    const api = window.consistentStoryEditor = window.consistentStoryEditor || {};
    const MAX_FILE = 1024 * 1024;

    function report(tab, message, error) {
        const button = api.el(tab, "save");
        if (!button) return;
        let out = button.nextElementSibling;
        if (!out || !out.classList.contains("cs-file-status")) {
            out = document.createElement("span");
            out.className = "cs-file-status";
            out.setAttribute("role", "status");
            button.insertAdjacentElement("afterend", out);
        }
        out.textContent = message;
        out.classList.toggle("cs-error", !!error);
    }
    function readStory(file) {
        const name = file.name, ext = (/\.[^.]*$/.exec(name.toLowerCase()) || [""])[0];
        if (ext !== ".txt" && ext !== ".json") return Promise.reject(new Error(name + ": not a .txt or .json file"));
        if (file.size > MAX_FILE) return Promise.reject(new Error(name + ": larger than 1 MiB"));
        return file.arrayBuffer().then((bytes) => {
            let text;
            try {
                text = new TextDecoder("utf-8", {fatal: true}).decode(bytes);
            } catch (e) {
                throw new Error(name + ": not UTF-8 text");
            }
            if (ext === ".json") {
                let data;
                try {
                    data = JSON.parse(text);
                } catch (e) {
                    throw new Error(name + ": invalid JSON: " + e.message);
                }
                if (!data || typeof data !== "object" || Array.isArray(data)) {
                    throw new Error(name + ": the JSON is not an object");
                }
            }
            return text;
        });
    }
    api.load = function(tab) {
        const input = document.createElement("input");
        input.type = "file";
        input.accept = ".txt,.json,text/plain,application/json";
        input.addEventListener("change", () => {
            const file = input.files && input.files[0], box = api.storyBox(tab);
            if (!file || !box) return;
            readStory(file).then((text) => {
                api.replaceRange(box, 0, box.value.length, text, 0);
                report(tab, "Loaded " + file.name, false);
            }, (e) => report(tab, e.message, true));
        });
        input.click();
    };
    api.save = function(tab) {
        const box = api.storyBox(tab);
        if (!box) return;
        const json = box.value.trim().startsWith("{"), name = json ? "story.json" : "story.txt";
        const url = URL.createObjectURL(new Blob([box.value], {type: json ? "application/json" : "text/plain"}));
        const a = document.createElement("a");
        a.href = url;
        a.download = name;
        a.style.display = "none";
        document.body.appendChild(a);
        a.click();
        a.remove();
        setTimeout(() => URL.revokeObjectURL(url), 1000);
        report(tab, "Saved " + name, false);
    };
})();
