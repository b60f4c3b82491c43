"""The "Characters" tab of both WebUIs (gradio 3.41 / 4.40): create a OneActor character, see the folder's list.

Host contract: ``on_ui_tabs`` returns ``[(blocks, title, elem_id)]``. The create button runs through
``call_queue.wrap_gradio_gpu_call`` (queue lock, ``shared.state``; its first argument ``task(...)`` id lets the
host's own progress bar follow the job: ``javascript/oneactor.js`` makes the id and calls ``requestProgress``).
On an error the wrapper fills the outputs with ``EXTRA_OUTPUTS`` and puts the message into the last one.
"""
from __future__ import annotations

import html
from typing import Any

JS_SUBMIT = "consistentStoryCreateCharacter"
EXTRA_OUTPUTS = [None, ""]  # preview, list; the wrapper appends the error text (status)


def characters_table() -> str:
    from .folder import characters_dir, describe_characters

    rows = []
    for item in describe_characters():
        if "error" in item:
            rows.append(f"<tr><td>{html.escape(item['name'])}</td><td colspan='3'>&#9888; "
                        f"{html.escape(item['error'])}</td></tr>")
        else:
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(item[k]))}</td>" for k in
                                         ("name", "base_word", "arch", "checkpoint_name")) + "</tr>")
    head = "<tr><th>name</th><th>base word</th><th>model</th><th>checkpoint</th></tr>"
    folder = html.escape(str(characters_dir()))
    body = "".join(rows) or "<tr><td colspan='4'>none yet</td></tr>"
    return f"<p>Folder: {folder}</p><table>{head}{body}</table>"


def create_from_tab(id_task: str, name: str, prompt: str, negative_prompt: str, base_word: str, seed: float,
                    human: bool, auxiliaries: float, tuning_steps: float, steps: float, cfg_scale: float,
                    width: float, height: float, overwrite: bool):
    from PIL import Image

    from ...oneactor.request import CreateRequest
    from .create import create_character

    request = CreateRequest(name=name.strip(), prompt=prompt, base_word=base_word.strip(),
                            negative_prompt=negative_prompt, seed=int(seed), auxiliaries=int(auxiliaries),
                            tuning_steps=int(tuning_steps), steps=int(steps), cfg_scale=float(cfg_scale),
                            width=int(width), height=int(height), human=bool(human), overwrite=bool(overwrite))
    summary = create_character(request)
    preview = None
    from pathlib import Path
    picture = Path(summary["file"]).with_suffix(".preview.png")
    from ...oneactor.character_file import load_character
    png = load_character(summary["file"]).preview_png
    if png:
        import io
        preview = Image.open(io.BytesIO(png))
        if not picture.exists():
            picture.write_bytes(png)
        # The hosts' gradio output for a PIL image (ui_tempdir.save_pil_to_file) serves a file the image says it was
        # saved as; otherwise it writes a temp file, into the 'temp_dir' setting without creating that folder, which a
        # fresh Forge Neo lacks (the whole output then fails).
        preview.already_saved_as = str(picture)
    status = (f"<p>Saved <b>{html.escape(summary['name'])}</b> ({html.escape(summary['file'])}) in "
              f"{summary['seconds']} s, final loss {summary['final_loss']:.4f}. Use it with "
              f"<code>&lt;oneactor:{html.escape(summary['name'])}&gt;</code> in a prompt containing "
              f"'{html.escape(summary['base_word'])}'.</p>")
    return preview, characters_table(), status


def _interrupt() -> None:
    """The txt2img Interrupt button's action: the running job (generation or tuning) stops, saving no file."""
    from modules import shared
    shared.state.interrupt()


def build_tab() -> list[tuple[Any, str, str]]:
    """``on_ui_tabs`` callback."""
    import gradio as gr
    from modules import call_queue

    def ids(name: str) -> dict:
        return {"elem_id": f"consistent_story_oa_{name}"}

    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            with gr.Column():
                task = gr.Textbox(visible=False, **ids("task"))
                name = gr.Textbox(label="Character name (its file name)", **ids("name"))
                prompt = gr.Textbox(label="Prompt of the image you like", lines=3, **ids("prompt"))
                negative = gr.Textbox(label="Negative prompt", lines=2, **ids("negative"))
                base_word = gr.Textbox(label="Base word: the word of the prompt that names the character "
                                             "(e.g. 'hobbit'); use it in later prompts", **ids("base_word"))
                with gr.Row():
                    seed = gr.Number(value=-1, label="Seed of that image (-1: random)", precision=0, **ids("seed"))
                    human = gr.Checkbox(value=False, label="Human subject (prompt templates)", **ids("human"))
                with gr.Row():
                    auxiliaries = gr.Slider(1, 32, value=10, step=1, label="Auxiliary images", **ids("auxiliaries"))
                    tuning_steps = gr.Slider(1, 1000, value=200, step=1, label="Tuning steps",
                                             **ids("tuning_steps"))
                with gr.Row():
                    steps = gr.Slider(1, 150, value=30, step=1, label="Sampling steps", **ids("steps"))
                    cfg = gr.Slider(1, 30, value=7.5, step=0.5, label="CFG scale", **ids("cfg"))
                with gr.Row():
                    width = gr.Slider(0, 2048, value=0, step=64, label="Width (0: 1024 SDXL, 512 SD1.5)",
                                      **ids("width"))
                    height = gr.Slider(0, 2048, value=0, step=64, label="Height (0: as width)", **ids("height"))
                overwrite = gr.Checkbox(value=False, label="Replace a character of the same name", **ids("overwrite"))
                with gr.Row():
                    create = gr.Button("Create character", variant="primary", **ids("create"))
                    interrupt = gr.Button("Interrupt", **ids("interrupt"))
            with gr.Column():
                gr.HTML(**ids("progress"))
                preview = gr.Image(label="Target image", interactive=False, type="pil", **ids("preview"))
                status = gr.HTML(**ids("status"))
                listing = gr.HTML(value=characters_table, **ids("list"))
                refresh = gr.Button("Refresh list", **ids("refresh"))
        inputs = [task, name, prompt, negative, base_word, seed, human, auxiliaries, tuning_steps, steps, cfg,
                  width, height, overwrite]
        js = {"_js": JS_SUBMIT} if gr.__version__.startswith("3.") else {"js": JS_SUBMIT}
        create.click(fn=call_queue.wrap_gradio_gpu_call(create_from_tab, extra_outputs=list(EXTRA_OUTPUTS)),
                     inputs=inputs, outputs=[preview, listing, status], show_progress=False, **js)
        interrupt.click(fn=_interrupt, inputs=[], outputs=[], show_progress=False)
        refresh.click(fn=characters_table, inputs=[], outputs=[listing], show_progress=False)
    return [(tab, "Characters", "consistent_story_characters")]
