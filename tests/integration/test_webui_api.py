"""Opt-in tests against a running WebUI (A1111 1.10 or Forge) with this extension installed.

Set ``CONSISTENT_STORY_WEBUI_URL`` (e.g. http://127.0.0.1:7860, started with ``--api``) to run them; they are
skipped otherwise. Small sizes and few steps keep them usable on a CPU-only server with a random checkpoint.
"""
from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request

import pytest

from lib_consistency.settings import Settings, axis_keys, axis_label, option_keys

URL = os.environ.get("CONSISTENT_STORY_WEBUI_URL", "").rstrip("/")
pytestmark = pytest.mark.skipif(not URL, reason="set CONSISTENT_STORY_WEBUI_URL to a running WebUI to run these")

STORY = "a small red fox with a white tail\nruns through snow # Morning\nsleeps in a hollow log # Night\n" \
        "[NC] an empty frozen lake # Dusk"
BASE = {"prompt": "watercolor", "negative_prompt": "", "steps": 3, "width": 64, "height": 64, "seed": 42,
        "sampler_name": "Euler", "cfg_scale": 5}


def call(path: str, payload: dict | None = None) -> tuple[int, dict]:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(URL + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=1800) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def txt2img(args: list | None = None, **fields) -> dict:
    payload = {**BASE, **fields}
    if args is not None:
        payload["alwayson_scripts"] = {"consistent story": {"args": args}}
    status, body = call("/sdapi/v1/txt2img", payload)
    assert status == 200, body
    body["info"] = json.loads(body["info"])
    return body


def story_args(**values) -> list:
    return [{"enabled": True, "story": STORY, **values}]


def image_bytes(body: dict, index: int = 0) -> bytes:
    return base64.b64decode(body["images"][index])


def test_script_info_lists_every_setting():
    status, scripts = call("/sdapi/v1/script-info")
    assert status == 200
    ours = [s for s in scripts if s["name"] == "consistent story"]
    assert {s["is_img2img"] for s in ours} == {False, True} and all(s["is_alwayson"] for s in ours)
    assert len(ours[0]["args"]) == len(option_keys())


def test_story_with_dict_args_gives_one_image_per_frame_and_a_storyboard():
    body = txt2img(story_args())
    info = body["info"]
    assert len(body["images"]) == 4  # 3 frames + storyboard
    assert info["all_prompts"] == ["watercolor, a small red fox with a white tail, runs through snow",
                                   "watercolor, a small red fox with a white tail, sleeps in a hollow log",
                                   "watercolor, an empty frozen lake"]
    assert info["all_seeds"] == [42, 42, 42]
    pasted = info["infotexts"][0]
    assert "Story Enabled: True" in pasted and "Story Preset: 1Prompt1Story" in pasted and "Story Text: " in pasted
    assert "watercolor, a small red fox" in pasted.splitlines()[0]  # the frame's own prompt, not the consolidation


def test_positional_args_equal_dict_args():
    positional = Settings.from_dict({"enabled": True, "story": STORY, "storyboard": False}).to_args()
    by_list = txt2img(positional)
    by_dict = txt2img(story_args(storyboard=False))
    assert len(by_list["images"]) == 3
    assert [image_bytes(by_list, i) for i in range(3)] == [image_bytes(by_dict, i) for i in range(3)]


def test_methods_change_the_images_and_vanilla_is_untouched():
    vanilla_before = image_bytes(txt2img())
    plain = txt2img(story_args(preset="Custom", consolidate=False, reweighting="none", ipca=False, csa=False,
                               storyboard=False))
    one_prompt = txt2img(story_args(storyboard=False))
    story_diffusion = txt2img(story_args(preset="StoryDiffusion", csa_layers="all", storyboard=False))
    vanilla_after = image_bytes(txt2img())
    assert vanilla_before == vanilla_after
    assert image_bytes(plain) != image_bytes(one_prompt)
    assert image_bytes(plain) != image_bytes(story_diffusion)


# Each preset, and the same story with that preset's attention methods off: what a patch that silently failed to
# reach the model gives (Forge Neo before it was supported: HTTP 200, plain frames, an infotext claiming the method).
PRESET_AND_METHODS_OFF = {
    "1Prompt1Story": ({}, dict(ipca=False)),
    "StoryDiffusion": (dict(csa_layers="all"), dict(csa=False)),
    "StorySync": ({}, dict(csa=False, masked_sharing=False)),
    "Combined": (dict(csa_layers="all"), dict(csa=False, ipca=False)),
}


@pytest.mark.parametrize("preset", list(PRESET_AND_METHODS_OFF))
def test_each_preset_reaches_the_model(preset):
    on, off = PRESET_AND_METHODS_OFF[preset]
    size = dict(width=128, height=128)  # StorySync's masks need a latent/4 level of a few tokens
    with_methods = txt2img(story_args(preset=preset, storyboard=False, **on), **size)
    without = txt2img(story_args(preset=preset, storyboard=False, **on, **off), **size)
    frames = len(with_methods["images"])
    assert frames == len(without["images"]) == 3
    assert [image_bytes(with_methods, i) for i in range(frames)] != [image_bytes(without, i) for i in range(frames)]
    assert f"Story Preset: {preset}" in with_methods["info"]["infotexts"][0]


@pytest.mark.parametrize("preset", list(PRESET_AND_METHODS_OFF))
def test_a_method_taken_away_by_another_extension_fails_the_request(preset):
    """With ``tests/integration/breaker_extension`` installed (skipped otherwise): the story's patches or hooks are
    removed during sampling; the request fails naming the method, and the WebUI is left as it was."""
    status, scripts = call("/sdapi/v1/script-info")
    if not any(s["name"] == "consistent story breaker (test)" for s in scripts):
        pytest.skip("the breaker extension (tests/integration/breaker_extension) is not installed")
    vanilla_before = image_bytes(txt2img())
    on, _ = PRESET_AND_METHODS_OFF[preset]
    payload = {**BASE, "prompt": "watercolor BREAKSTORYPATCHES",
               "alwayson_scripts": {"consistent story": {"args": story_args(preset=preset, **on)}}}
    status, body = call("/sdapi/v1/txt2img", payload)
    assert status >= 400, "frames were returned without the story's methods"
    assert "did not run in this UNet call" in json.dumps(body) and "Consistent Story" in json.dumps(body)
    assert image_bytes(txt2img()) == vanilla_before


def test_twelve_frames_in_batches_of_four():
    story = "a small red fox\n" + "\n".join(f"scene {i} in the forest" for i in range(12))
    body = txt2img([{"enabled": True, "story": story, "preset": "Combined", "csa_layers": "all",
                     "frames_per_batch": 4, "seed_mode": "sequential"}])
    assert len(body["images"]) == 13
    assert body["info"]["all_seeds"] == list(range(42, 54))
    assert "Story Frames per batch: 4" in body["info"]["infotexts"][0]


def test_hires_fix_keeps_the_story():
    # hr_additional_modules: Forge's API fails hires requests without it (a plain request too); A1111 ignores it.
    body = txt2img(story_args(preset="Combined", csa_layers="all", storyboard=False), enable_hr=True, hr_scale=2,
                   hr_upscaler="Latent", hr_second_pass_steps=2, denoising_strength=0.6,
                   hr_additional_modules=["Use same choices"])
    assert len(body["images"]) == 3
    png = image_bytes(body)
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (128, 128)
    assert "Hires upscale: 2" in body["info"]["infotexts"][0]


@pytest.mark.parametrize("args, words", [
    ([{"enabled": True, "story": STORY, "colour": "red"}], ["colour", "unknown key"]),
    ([{"enabled": True, "story": STORY, "csa_rate": 5}], ["csa_rate", "out of range"]),
    ([{"enabled": True, "story": STORY, "window": "many"}], ["window", "expected a number"]),
    ([{"enabled": True, "story": "hero\n[Bob] runs"}], ["story line 2", "[Bob]"]),
    ([{"enabled": True, "story": "Bob: a man\n---\nwalks"}], ["story line 3", "no character tag"]),
])
def test_bad_input_fails_the_request_with_a_message(args, words):
    status, body = call("/sdapi/v1/txt2img", {**BASE, "alwayson_scripts": {"consistent story": {"args": args}}})
    assert status >= 400
    text = json.dumps(body)
    for word in words:
        assert word in text, text


def xyz_script_args(*axes: tuple[str, str]) -> list:
    """The X/Y/Z plot script's positional args for up to three (axis label, values) pairs, built from the server's
    own script-info: its argument list differs between hosts (Forge Neo adds 'Row Count'). Sub-images included."""
    status, scripts = call("/sdapi/v1/script-info")
    assert status == 200, scripts
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
    choices = next(a for a in xyz["args"] if a["label"] == "X type")["choices"]
    args, seen = [], set()
    for arg in xyz["args"]:
        label, axis = arg["label"], "XYZ".find(arg["label"][:1])
        chosen = axes[axis] if 0 <= axis < len(axes) else ("Nothing", "")
        if axis >= 0 and label.endswith(" type"):
            args.append(choices.index(chosen[0]))
        elif axis >= 0 and label.endswith(" values"):
            args.append(chosen[1] if label not in seen else [])  # the text box, then the dropdown
        else:
            args.append(True if label == "Include Sub Images" else arg["value"])
        seen.add(label)
    return args


def test_xyz_plot_over_a_story_axis():
    status, scripts = call("/sdapi/v1/script-info")
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
    x_types = next(a for a in xyz["args"] if a["label"] == "X type")["choices"]
    assert [label for label in x_types if label.startswith("[Story] ")] == [axis_label(k) for k in axis_keys()]
    script_args = xyz_script_args((axis_label("csa_rate"), "0.25, 1.0"))
    body = txt2img(story_args(preset="StoryDiffusion", csa_layers="all", storyboard=False),
                   script_name="x/y/z plot", script_args=script_args)
    infotexts = body["info"]["infotexts"]
    assert any("Story CSA rate: 0.25" in t for t in infotexts) and any("Story CSA rate: 1.0" in t for t in infotexts)
    cells = [i for i, t in enumerate(infotexts) if "Story CSA rate" in t][-2:]
    assert image_bytes(body, cells[0]) != image_bytes(body, cells[1])


def test_infotext_restores_the_story_and_the_style():
    """The API's ``infotext`` field goes through the same paste mapping as the UI's paste button."""
    plain = txt2img()
    if call("/sdapi/v1/txt2img", {"infotext": plain["info"]["infotexts"][0]})[0] != 200:
        pytest.skip("this WebUI's API cannot replay even a plain infotext (Forge: a pydantic type error)")
    first = txt2img(story_args(storyboard=False))
    status, again = call("/sdapi/v1/txt2img", {"infotext": first["info"]["infotexts"][1]})
    assert status == 200, again
    again["info"] = json.loads(again["info"])
    assert again["info"]["all_prompts"] == first["info"]["all_prompts"]  # style, not frame 1's prompt, restored
    assert [image_bytes(again, i) for i in range(3)] == [image_bytes(first, i) for i in range(3)]


def test_img2img_story_from_one_init_image():
    init = txt2img()["images"][0]
    status, body = call("/sdapi/v1/img2img", {**BASE, "init_images": [init], "denoising_strength": 0.6,
                                              "alwayson_scripts": {"consistent story": {"args": story_args()}}})
    assert status == 200, body
    info = json.loads(body["info"])
    assert len(body["images"]) == 4 and len(info["all_prompts"]) == 3
    assert "Story Enabled: True" in info["infotexts"][0]


def test_token_spans_are_recorded_in_the_infotext():
    body = txt2img(story_args(storyboard=False))
    infotext = body["info"]["infotexts"][0]
    # "watercolor, a small red fox with a white tail" then the three frames, in the host's own tokenisation
    assert "Story Token spans: SOT 0; identity 1-" in infotext and "; frames " in infotext, infotext
    assert infotext.count("Story Token spans") == 1


def test_emphasis_running_across_two_lines_is_refused_naming_them():
    story = "a small red fox (with a white tail\nruns through snow)\nsleeps in a hollow log"
    status, body = call("/sdapi/v1/txt2img", {**BASE, "alwayson_scripts": {"consistent story": {"args": [
        {"enabled": True, "story": story}]}}})
    assert status >= 400
    text = json.dumps(body)
    assert "the identity prompt where it meets frame 1 ('runs through snow)')" in text.replace('\\"', '"'), text
    assert "tokenises differently inside the consolidated prompt" in text
    assert image_bytes(txt2img()) == image_bytes(txt2img())  # the WebUI is left as it was


def test_one_frame_story_needs_consolidation_off():
    one = "a small red fox with a white tail\nsleeps in a hollow log"
    status, body = call("/sdapi/v1/txt2img", {**BASE, "alwayson_scripts": {"consistent story": {"args": [
        {"enabled": True, "story": one}]}}})
    assert status >= 400 and "at least 2 frames" in json.dumps(body) and "consolidate" in json.dumps(body)
    single = txt2img([{"enabled": True, "story": one, "preset": "StoryDiffusion", "storyboard": False}])
    assert len(single["images"]) == 1


# --- StorySync ------------------------------------------------------------------------------------------------------

NAMED = ("Bob: a tall man with red hair and a green coat | man, coat\nAlice: a girl with a blue scarf\n---\n"
         "[Bob] reads a letter in a kitchen # The letter\n[Alice] waits at a station\n"
         "[Bob] [Alice] walk along the beach # Reunited\n[NC] an empty street at night")


def storysync_args(**values) -> list:
    return [{"enabled": True, "story": STORY, "preset": "StorySync", "storyboard": False, **values}]


def test_storysync_one_character_changes_the_images_and_vanilla_is_untouched():
    vanilla_before = image_bytes(txt2img())
    plain = txt2img(story_args(preset="Custom", consolidate=False, reweighting="none", ipca=False, csa=False,
                               storyboard=False))
    synced = txt2img(storysync_args())
    vanilla_after = image_bytes(txt2img())
    assert vanilla_before == vanilla_after
    assert len(synced["images"]) == 3 and "Story Masked sharing: True" in synced["info"]["infotexts"][0]
    assert [image_bytes(synced, i) for i in range(3)] != [image_bytes(plain, i) for i in range(3)]


def test_storysync_named_characters_with_masks_shown():
    body = txt2img([{"enabled": True, "story": NAMED, "preset": "StorySync", "show_masks": True,
                     "storyboard": True}])
    # 4 frames, the storyboard, then a mask image for each frame with a character ([NC] has none)
    assert len(body["images"]) == 4 + 1 + 3
    png = image_bytes(body, 5)
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (64, 64)


def test_storysync_twelve_frames_in_batches_of_four_with_references():
    story = "a small red fox\n" + "\n".join(f"scene {i} in the forest" for i in range(12))
    body = txt2img([{"enabled": True, "story": story, "preset": "StorySync", "frames_per_batch": 4,
                     "reference_frames": 2, "storyboard": False}])
    assert len(body["images"]) == 12 and "Story Reference frames: 2" in body["info"]["infotexts"][0]


def test_storysync_with_hires_fix_and_combined_with_1prompt1story():
    body = txt2img(storysync_args(preset="Combined", masked_sharing=True, csa_layers="up"), enable_hr=True,
                   hr_scale=2, hr_upscaler="Latent", hr_second_pass_steps=2, denoising_strength=0.6,
                   hr_additional_modules=["Use same choices"])
    png = image_bytes(body)
    assert len(body["images"]) == 3 and (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) \
        == (128, 128)
    assert "Story Consolidate: True" in body["info"]["infotexts"][0]


def test_storysync_bad_subject_word_names_the_line():
    story = NAMED.replace("| man, coat", "| man, hat")
    status, body = call("/sdapi/v1/txt2img", {**BASE, "alwayson_scripts": {"consistent story": {"args": [
        {"enabled": True, "story": story, "preset": "StorySync"}]}}})
    assert status >= 400 and "story line 1: subject word 'hat' is not in Bob's description" in json.dumps(body)


def test_storysync_xyz_over_rfh_and_bli():
    script_args = xyz_script_args((axis_label("bli_strength"), "0.0, 1.0"), (axis_label("rfh_strength"), "0.0, 0.9"))
    body = txt2img(storysync_args(rfh_start=0.0, rfh_end=1.0), script_name="x/y/z plot", script_args=script_args)
    infotexts = body["info"]["infotexts"]
    assert any("Story BLI strength: 0.0" in t and "Story RFH strength: 0.9" in t for t in infotexts)
    assert any("Story BLI strength: 1.0" in t and "Story RFH strength: 0.0" in t for t in infotexts)


def test_storysync_img2img():
    init = txt2img()["images"][0]
    status, body = call("/sdapi/v1/img2img", {**BASE, "init_images": [init], "denoising_strength": 0.6,
                                              "alwayson_scripts": {"consistent story": {"args": storysync_args()}}})
    assert status == 200, body
    assert len(body["images"]) == 3


def test_storysync_prepass_leaves_the_sampling_reproducible():
    """An ancestral sampler draws noise at every step from the host's RNG: two StorySync runs (each with its BLI
    pre-pass) give the same bytes, and a plain run after them is the same as before."""
    plain_before = image_bytes(txt2img(sampler_name="Euler a"))
    first = txt2img(storysync_args(), sampler_name="Euler a")
    second = txt2img(storysync_args(), sampler_name="Euler a")
    assert [image_bytes(first, i) for i in range(3)] == [image_bytes(second, i) for i in range(3)]
    assert image_bytes(txt2img(sampler_name="Euler a")) == plain_before


SAG = "selfattentionguidance integrated (sd 1.x, sd 2.x, sdxl)"  # Forge's built-in, an attn1 replace patch


def test_another_extensions_attention_patch_is_kept_or_the_combination_refused():
    """Forge: SAG's patch on the middle block still runs under ours (CSA on the up blocks: the images differ from CSA
    alone, and nothing fails); StorySync, whose BLI changes every block, is refused with SAG's patch named."""
    status, scripts = call("/sdapi/v1/script-info")
    if not any(s["name"] == SAG for s in scripts):
        pytest.skip("needs Forge's built-in SelfAttentionGuidance script")
    sag = {SAG: {"args": [True, 0.5, 2.0, 1.0]}}
    csa = story_args(preset="StoryDiffusion", csa_layers="up", storyboard=False)
    alone = txt2img(csa)
    both = txt2img(alwayson_scripts={"consistent story": {"args": csa}, **sag})
    assert [image_bytes(both, i) for i in range(3)] != [image_bytes(alone, i) for i in range(3)]
    payload = {**BASE, "alwayson_scripts": {"consistent story": {"args": story_args(preset="StorySync")}, **sag}}
    status, body = call("/sdapi/v1/txt2img", payload)
    text = " ".join(str(body.get(key) or "") for key in ("detail", "errors", "message"))
    assert status != 200 and "StorySync cannot share" in text and "attn_and_record" in text, text


# --- issue 11: extra networks and Dynamic Prompts beside a story ----------------------------------------------------

def a_lora() -> str:
    """``CONSISTENT_STORY_LORA`` (a LoRA made for the loaded checkpoint), else the only LoRA the WebUI lists."""
    status, loras = call("/sdapi/v1/loras")
    names = [lora["name"] for lora in loras] if status == 200 else []
    wanted = os.environ.get("CONSISTENT_STORY_LORA") or (names[0] if len(names) == 1 else "")
    if wanted not in names:
        pytest.skip("set CONSISTENT_STORY_LORA to a LoRA file (made for the loaded checkpoint) the WebUI lists")
    return wanted


def pixels(body: dict, index: int = 0) -> bytes:
    """The image's pixels only: its PNG also carries its infotext, which differs wherever the prompt does."""
    from PIL import Image
    return Image.open(io.BytesIO(image_bytes(body, index))).convert("RGB").tobytes()


def difference(a: bytes, b: bytes) -> float:
    """Mean absolute difference of two images' pixel bytes (0-255 scale)."""
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a)


def test_each_frame_gets_the_loras_its_own_prompt_names():
    """A LoRA in a description acts on that character's frames only (one frame per batch), one in the style on
    every frame; a LoRA at weight 0 changes nothing (its tag never reaches the text encoder as words)."""
    lora = a_lora()
    plain_before = image_bytes(txt2img())
    story = STORY.replace("white tail", f"white tail <lora:{lora}:1>")
    tagged = txt2img(story_args(story=story, frames_per_batch=1, storyboard=False))
    untagged = txt2img(story_args(frames_per_batch=1, storyboard=False))
    assert [f"<lora:{lora}:1>" in prompt for prompt in tagged["info"]["all_prompts"]] == [True, True, False]
    assert pixels(tagged, 0) != pixels(untagged, 0) and pixels(tagged, 1) != pixels(untagged, 1)
    assert pixels(tagged, 2) == pixels(untagged, 2)  # the [NC] frame: no LoRA in its batch
    in_style = txt2img(story_args(frames_per_batch=1, storyboard=False), prompt=f"watercolor <lora:{lora}:1>")
    assert all(pixels(in_style, i) != pixels(untagged, i) for i in range(3))
    weightless = txt2img(story_args(story=story.replace(f"<lora:{lora}:1>", f"<lora:{lora}:0>"), frames_per_batch=1,
                                    storyboard=False), prompt=f"watercolor <lora:{lora}:0>")
    assert [pixels(weightless, i) for i in range(3)] == [pixels(untagged, i) for i in range(3)]
    assert image_bytes(txt2img()) == plain_before


def two_loras() -> tuple[str, str]:
    """``CONSISTENT_STORY_LORA`` and a second LoRA for the same checkpoint, ``CONSISTENT_STORY_LORA_2`` (a copy of
    the first under another name will do)."""
    first = a_lora()
    status, loras = call("/sdapi/v1/loras")
    second = os.environ.get("CONSISTENT_STORY_LORA_2", "")
    if second == first or second not in [lora["name"] for lora in loras]:
        pytest.skip("set CONSISTENT_STORY_LORA_2 to a second LoRA file (made for the loaded checkpoint) the WebUI lists")
    return first, second


LILY_TOM = "Lily: a girl{lily}\nTom: an old man{tom}\n---\n[Lily] reads\n[Tom] walks\n[Lily] sleeps\n[Tom] sits\n" \
    "[NC] rain"
METHODS_OFF = dict(preset="Custom", consolidate=False, reweighting="none", ipca=False, csa=False)


def lily_tom(lily: str = "", tom: str = "") -> str:
    return LILY_TOM.format(lily=f" <lora:{lily}>" if lily else "", tom=f" <lora:{tom}>" if tom else "")


@pytest.mark.parametrize("values", [dict(), dict(preset="StoryDiffusion", csa_layers="all"),
                                    dict(preset="StorySync", frames_per_batch=2)])
def test_characters_with_their_own_loras_are_drawn_in_batches_by_network_set_in_story_order(values):
    """Issue 24: Lily's and Tom's frames in different batches (no refusal); images and infotexts in story order."""
    first, second = two_loras()
    story = lily_tom(f"{first}:1", f"{second}:1")
    body = txt2img([{"enabled": True, "story": story, "seed_mode": "sequential", "storyboard": False, **values}],
                   **(dict(width=128, height=128) if values.get("preset") == "StorySync" else {}))
    info = body["info"]
    expected = [f"watercolor, a girl <lora:{first}:1>, reads", f"watercolor, an old man <lora:{second}:1>, walks",
                f"watercolor, a girl <lora:{first}:1>, sleeps", f"watercolor, an old man <lora:{second}:1>, sits",
                "watercolor, rain"]
    assert len(body["images"]) == 5 and info["all_prompts"] == expected and info["all_seeds"] == [42 + i for i in
                                                                                                  range(5)]
    for i, infotext in enumerate(info["infotexts"]):  # image i is frame i: its own prompt and seed
        assert infotext.splitlines()[0] == expected[i] and f"Seed: {42 + i}," in infotext, (i, infotext)


def test_a_story_by_network_set_with_hires_fix_and_in_img2img():
    """Hires prompts and img2img rows follow each batch: frames come back in story order with their own seeds."""
    first, second = two_loras()
    args = [{"enabled": True, "story": lily_tom(f"{first}:1", f"{second}:1"), "seed_mode": "sequential",
             "storyboard": False}]
    hires = txt2img(args, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_second_pass_steps=2,
                    denoising_strength=0.6, hr_additional_modules=["Use same choices"])
    init = txt2img()["images"][0]
    status, body = call("/sdapi/v1/img2img", {**BASE, "init_images": [init], "denoising_strength": 0.6,
                                              "alwayson_scripts": {"consistent story": {"args": args}}})
    assert status == 200, body
    for result in (hires["info"], json.loads(body["info"])):
        assert [text.splitlines()[0] for text in result["infotexts"]] == result["all_prompts"]
        assert [f"Seed: {42 + i}," in text for i, text in enumerate(result["infotexts"])] == [True] * 5


def test_a_story_by_network_set_saves_frames_and_grid_in_story_order():
    """With ``save_images`` the WebUI would save frames as it draws them (batch order); the story saves them after
    the last batch, in story order, and returns its grid first."""
    first, second = two_loras()
    body = txt2img([{"enabled": True, "story": lily_tom(f"{first}:1", f"{second}:1"), "seed_mode": "sequential",
                     "storyboard": False, **METHODS_OFF}], save_images=True)
    infotexts = body["info"]["infotexts"]
    assert len(body["images"]) == len(infotexts) == 6 and body["info"]["index_of_first_image"] == 1
    assert [text.split("Seed: ")[1].split(",")[0] for text in infotexts[1:]] == [str(42 + i) for i in range(5)]


@pytest.mark.parametrize("values", [METHODS_OFF, dict()])
def test_a_frame_without_loras_is_the_same_as_in_the_story_without_any(values):
    """Methods off (frames independent of each other) or 1Prompt1Story alone (every frame's consolidated prompt is
    the same text; the [NC] frame's batch has no LoRA, so it is encoded as without tags): the [NC] frame, drawn
    alone after the LoRA batches, is byte-identical to the same frame of the untagged story (also drawn alone, in a
    batch of 2 frames per batch). With shared self-attention frames depend on their batch mates, so not there."""
    first, second = two_loras()
    args = dict(seed_mode="sequential", storyboard=False, frames_per_batch=2, **values)
    tagged = txt2img([{"enabled": True, "story": lily_tom(f"{first}:1", f"{second}:1"), **args}])
    untagged = txt2img([{"enabled": True, "story": lily_tom(), **args}])
    assert pixels(tagged, 4) == pixels(untagged, 4)
    assert all(pixels(tagged, i) != pixels(untagged, i) for i in range(4))


def test_each_frame_moves_only_with_its_own_loras():
    """Tom's LoRA weight changed: Tom's frames change, Lily's and the [NC] frame do not (methods off)."""
    first, second = two_loras()
    args = dict(seed_mode="sequential", storyboard=False, frames_per_batch=2, **METHODS_OFF)
    full = txt2img([{"enabled": True, "story": lily_tom(f"{first}:1", f"{second}:1"), **args}])
    half = txt2img([{"enabled": True, "story": lily_tom(f"{first}:1", f"{second}:0.5"), **args}])
    assert [pixels(full, i) == pixels(half, i) for i in range(5)] == [True, False, True, False, True]


DYNAMIC_PROMPTS = "dynamic prompts"  # the script's name in script-info starts with this (its title has a version)


def dynamic_prompts_installed() -> bool:
    status, scripts = call("/sdapi/v1/script-info")
    return any(s["name"].startswith(DYNAMIC_PROMPTS) for s in scripts)


def test_a_story_is_not_expanded_by_dynamic_prompts():
    """With sd-dynamic-prompts on (its default, also over the API) a story keeps its frames; a frame using its
    syntax is refused naming the line; a plain request afterwards is still expanded by it."""
    if not dynamic_prompts_installed():
        pytest.skip("needs the sd-dynamic-prompts extension")
    body = txt2img(story_args(storyboard=False))
    assert body["info"]["all_prompts"] == ["watercolor, a small red fox with a white tail, runs through snow",
                                           "watercolor, a small red fox with a white tail, sleeps in a hollow log",
                                           "watercolor, an empty frozen lake"]
    assert body["info"]["all_seeds"] == [42, 42, 42]
    status, refused = call("/sdapi/v1/txt2img", {**BASE, "alwayson_scripts": {"consistent story": {"args": story_args(
        story=STORY.replace("runs through snow", "runs through {snow|rain}"))}}})
    assert status >= 400 and "frame 1 (story line 2) uses Dynamic Prompts syntax '{snow|rain}'" in json.dumps(refused)
    plain = txt2img(prompt="a {red|blue} cat", batch_size=2)
    assert all("{" not in prompt for prompt in plain["info"]["all_prompts"]), plain["info"]["all_prompts"]


def test_hypertile_composes_on_layers_the_story_does_not_share():
    """A1111's built-in Hypertile on the UNet: at max depth 0 on SD1.5 it tiles only full-resolution layers, which
    StoryDiffusion's `up_low_res` leaves alone (both run); at depth 3 it would tile a shared layer (refused)."""
    status, options = call("/sdapi/v1/options")  # lists only the options set so far
    if is_forge():
        pytest.skip("needs A1111's built-in Hypertile")
    if "xl" in options.get("sd_model_checkpoint", "").lower():
        pytest.skip("written for SD1.5 layer depths")
    keep = {"hypertile_enable_unet": options.get("hypertile_enable_unet", False),
            "hypertile_max_depth_unet": options.get("hypertile_max_depth_unet", 3)}
    csa = story_args(preset="StoryDiffusion", csa_layers="up_low_res", storyboard=False)
    alone = txt2img(csa)
    try:
        assert call("/sdapi/v1/options", {"hypertile_enable_unet": True, "hypertile_max_depth_unet": 0})[0] == 200
        both = txt2img(csa)
        assert len(both["images"]) == 3 and "Hypertile U-Net: True" in both["info"]["infotexts"][0]
        assert "Story Preset: StoryDiffusion" in both["info"]["infotexts"][0]
        assert call("/sdapi/v1/options", {"hypertile_max_depth_unet": 3})[0] == 200
        status, body = call("/sdapi/v1/txt2img", {**BASE, "alwayson_scripts": {"consistent story": {"args": csa}}})
        assert status >= 400 and "Hypertile (UNet) splits the self-attention of output_blocks" in json.dumps(body)
    finally:
        call("/sdapi/v1/options", keep)
    assert [pixels(txt2img(csa), i) for i in range(3)] == [pixels(alone, i) for i in range(3)]


# --- ControlNet: sd-webui-controlnet on A1111, the built-in one on Forge --------------------------------------------

def control_image(seed: int, size: int = 64) -> str:
    """A random RGB control image, base64 PNG (a random ControlNet turns any image into residuals)."""
    import random
    from PIL import Image
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def controlnet_model() -> str:
    """``CONSISTENT_STORY_CONTROLNET``: a ControlNet model title the WebUI lists, made for the loaded checkpoint."""
    wanted = os.environ.get("CONSISTENT_STORY_CONTROLNET", "")
    status, body = call("/controlnet/model_list")
    if not wanted or status != 200 or wanted not in body.get("model_list", []):
        pytest.skip("set CONSISTENT_STORY_CONTROLNET to a ControlNet model (for the loaded checkpoint) the WebUI lists")
    return wanted


def is_forge() -> bool:
    return "forge_preset" in call("/sdapi/v1/options")[1]


def with_controlnet(args: list | None, *units: dict, **fields) -> dict:
    scripts = {"ControlNet": {"args": list(units)}}
    if args is not None:
        scripts["consistent story"] = {"args": args}
    return txt2img(alwayson_scripts=scripts, override_settings={"control_net_no_detectmap": True}, **fields)


def unit(model: str, **fields) -> dict:
    return {"enabled": True, "model": model, "weight": 1.0, "save_detected_map": False, **fields}


def test_one_control_image_poses_every_frame_and_both_take_effect():
    model = controlnet_model()
    plain_before = image_bytes(txt2img())
    image = unit(model, image=control_image(1))
    for preset in ("1Prompt1Story", "StoryDiffusion"):
        # "always": at 3 steps the official schedule shares in the last step only (the hosts report step 0 for the
        # first two denoiser calls), whose change to frame 1 can round away (seen in Forge Neo)
        args = story_args(preset=preset, csa_layers="all", csa_schedule="always", storyboard=False)
        both = with_controlnet(args, image)
        story_alone = txt2img(args)
        control_alone = with_controlnet(None, image, prompt=both["info"]["all_prompts"][0])
        assert len(both["images"]) == 3
        assert all(pixels(both, i) != pixels(story_alone, i) for i in range(3))  # ControlNet's residuals act
        assert pixels(both, 0) != pixels(control_alone, 0)  # and so do the story's hooks
        assert [pixels(both, i) for i in range(3)] == [pixels(with_controlnet(args, image), i) for i in range(3)]
    assert image_bytes(txt2img()) == plain_before


def test_control_images_one_per_frame_in_story_order_across_batches(tmp_path):
    """A1111 (batch input folder, one image per image of a batch): with 4 frames in batches of 2, frame k is the
    image the same story makes with control image k for every frame (1Prompt1Story frames do not interact)."""
    model = controlnet_model()
    if is_forge():
        pytest.skip("Forge's API does not take per-image ControlNet inputs (it ignores 'input_mode')")
    story = "a small red fox\nruns\nsleeps\nsits\njumps"
    for k in range(4):
        (tmp_path / f"{k}.png").write_bytes(base64.b64decode(control_image(10 + k)))
    args = story_args(story=story, frames_per_batch=2, storyboard=False)
    per_frame = with_controlnet(args, unit(model, animatediff_batch=True, batch_images=str(tmp_path)))
    assert len(per_frame["images"]) == 4
    alone = [with_controlnet(args, unit(model, image=control_image(10 + k))) for k in range(4)]
    for k in range(4):  # nearest to the run with its own image (batched kernels round a little differently)
        distances = [difference(pixels(per_frame, k), pixels(run, k)) for run in alone]
        assert distances.index(min(distances)) == k and distances[k] < 0.5, (k, distances)
    (tmp_path / "4.png").write_bytes(base64.b64decode(control_image(99)))
    status, body = call("/sdapi/v1/txt2img", {**BASE, "alwayson_scripts": {"consistent story": {"args": args},
        "ControlNet": {"args": [unit(model, animatediff_batch=True, batch_images=str(tmp_path))]}}})
    assert status >= 400 and "has 5 control images for a story of 4 frames" in json.dumps(body), body


def test_controlnet_with_hires_fix_keeps_the_story():
    model = controlnet_model()
    body = with_controlnet(story_args(preset="Combined", csa_layers="all", storyboard=False),
                           unit(model, image=control_image(2)), enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                           hr_second_pass_steps=2, denoising_strength=0.6, hr_additional_modules=["Use same choices"])
    assert len(body["images"]) == 3
    png = image_bytes(body)
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (128, 128)
    assert "Story Preset: Combined" in body["info"]["infotexts"][0]
