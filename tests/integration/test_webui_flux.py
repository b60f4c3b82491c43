"""Opt-in tests against a running Forge or Forge Neo whose loaded checkpoint is a Flux model (dev or schnell).

Set ``CONSISTENT_STORY_WEBUI_URL`` and ``CONSISTENT_STORY_FLUX=1`` (the server's current checkpoint is Flux) to run
them; skipped otherwise. A randomly initialised, shrunken Flux on a CPU server is enough: every code path runs.
"""
from __future__ import annotations

import json
import os

import pytest

from lib_consistency.settings import axis_label
from tests.integration.test_webui_api import call, image_bytes, xyz_script_args

URL = os.environ.get("CONSISTENT_STORY_WEBUI_URL", "").rstrip("/")
pytestmark = pytest.mark.skipif(not URL or os.environ.get("CONSISTENT_STORY_FLUX") != "1",
                                reason="set CONSISTENT_STORY_WEBUI_URL to a WebUI running a Flux checkpoint and "
                                       "CONSISTENT_STORY_FLUX=1 to run these")

STORY = "a small red fox with a white tail\nruns through snow # Morning\nsleeps in a hollow log # Night\n" \
        "[NC] an empty frozen lake # Dusk"
NAMED = ("Bob: a tall man with red hair and a green coat | man, coat\nAlice: a girl with a blue scarf\n---\n"
         "[Bob] reads a letter in a kitchen # The letter\n[Alice] waits at a station\n"
         "[Bob] [Alice] walk along the beach # Reunited\n[NC] an empty street at night")
# Flux dev's usual setting: distilled guidance, CFG 1 (cond rows only). 128 px = a 8x8 grid of image tokens.
BASE = {"prompt": "watercolor", "negative_prompt": "", "steps": 3, "width": 128, "height": 128, "seed": 42,
        "sampler_name": "Euler", "scheduler": "Simple", "cfg_scale": 1, "distilled_cfg_scale": 3.5}
# Each preset, and the same story with its attention methods off (what a surface that never ran would give)
ON_AND_OFF = {"1Prompt1Story": dict(ipca=False), "StoryDiffusion": dict(csa=False),
              "StorySync": dict(csa=False, masked_sharing=False), "Combined": dict(csa=False, ipca=False)}


def txt2img(args: list | None = None, fails: bool = False, **fields) -> dict:
    payload = {**BASE, **fields}
    if args is not None:
        payload["alwayson_scripts"] = {"consistent story": {"args": args}}
    status, body = call("/sdapi/v1/txt2img", payload)
    assert (status >= 400) if fails else (status == 200), body
    if status == 200:
        body["info"] = json.loads(body["info"])
    return body


def story(preset: str, text: str = STORY, **values) -> list:
    return [{"enabled": True, "story": text, "preset": preset, "storyboard": False, **values}]


def frames(body: dict, count: int) -> list[bytes]:
    return [image_bytes(body, i) for i in range(count)]


@pytest.mark.parametrize("preset", list(ON_AND_OFF))
@pytest.mark.parametrize("cfg", [1, 3])
def test_each_flux_preset_reaches_the_transformer_and_vanilla_is_untouched(preset, cfg):
    vanilla_before = image_bytes(txt2img(cfg_scale=cfg))
    with_methods = txt2img(story(preset), cfg_scale=cfg)
    without = txt2img(story(preset, **ON_AND_OFF[preset]), cfg_scale=cfg)
    assert len(with_methods["images"]) == len(without["images"]) == 3
    assert frames(with_methods, 3) != frames(without, 3)
    assert f"Story Preset: {preset}" in with_methods["info"]["infotexts"][0]
    assert image_bytes(txt2img(cfg_scale=cfg)) == vanilla_before


def test_flux_storysync_named_characters_masks_and_storyboard():
    body = txt2img(story("StorySync", NAMED, show_masks=True, storyboard=True))
    assert len(body["images"]) == 4 + 1 + 3  # frames, the storyboard, a mask image per frame with a character
    png = image_bytes(body, 5)
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (128, 128)


@pytest.mark.parametrize("preset", list(ON_AND_OFF))
def test_flux_twelve_frames_in_batches_of_four_through_the_bank(preset):
    text = "a small red fox\n" + "\n".join(f"scene {i} in the forest" for i in range(12))
    body = txt2img(story(preset, text, frames_per_batch=4, reference_frames=2, seed_mode="sequential"))
    assert len(body["images"]) == 12 and body["info"]["all_seeds"] == list(range(42, 54))
    assert "Story Frames per batch: 4" in body["info"]["infotexts"][0]


def test_flux_hires_fix_keeps_the_story():
    body = txt2img(story("StorySync"), enable_hr=True, hr_scale=2, hr_upscaler="Latent", hr_second_pass_steps=2,
                   denoising_strength=0.6, hr_additional_modules=["Use same choices"])
    png = image_bytes(body)
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (256, 256)
    assert "Hires upscale: 2" in body["info"]["infotexts"][0]


def test_flux_xyz_over_a_storysync_axis():
    script_args = xyz_script_args((axis_label("rfh_strength"), "0, 0.8"))
    body = txt2img(story("StorySync"), script_name="x/y/z plot", script_args=script_args)
    infotexts = body["info"]["infotexts"]
    assert any("Story RFH strength: 0.0" in t for t in infotexts)
    assert any("Story RFH strength: 0.8" in t for t in infotexts)


def test_flux_consolidation_counts_t5_tokens_and_records_its_spans():
    body = txt2img(story("1Prompt1Story"))
    infotext = body["info"]["infotexts"][0]
    assert "Story Token spans: T5 identity 0-" in infotext and "; frames " in infotext, infotext
    plain = txt2img(story("Custom", consolidate=False, reweighting="none", ipca=False, csa=False))
    assert frames(body, 3) != frames(plain, 3)  # SVR'd T5 contexts reached the transformer


def test_flux_refuses_a_oneactor_tag_saying_why():
    body = txt2img(None, fails=True, prompt="watercolor <oneactor:somebody>")
    text = json.dumps(body)
    assert "OneActor" in text and "middle block" in text, text


@pytest.mark.parametrize("preset", list(ON_AND_OFF))
def test_flux_methods_taken_away_by_another_extension_fail_the_request(preset):
    """With ``tests/integration/breaker_extension`` installed (skipped otherwise): it assigns a fresh patcher
    clone after ours, dropping the model wrapper that brings the DiT surface in; the request fails naming the
    method, and the WebUI is left as it was."""
    status, scripts = call("/sdapi/v1/script-info")
    if not any(s["name"] == "consistent story breaker (test)" for s in scripts):
        pytest.skip("the breaker extension (tests/integration/breaker_extension) is not installed")
    vanilla_before = image_bytes(txt2img())
    body = txt2img(story(preset), fails=True, prompt="watercolor BREAKSTORYPATCHES")
    assert "did not run in this UNet call" in json.dumps(body) and "Consistent Story" in json.dumps(body)
    assert image_bytes(txt2img()) == vanilla_before
