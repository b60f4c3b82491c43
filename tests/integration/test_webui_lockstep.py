"""StorySync's BLI in lock-step (``bli_lockstep``) on a running WebUI (set CONSISTENT_STORY_WEBUI_URL; the helpers and
the payload are ``test_webui_api``'s): the pre-pass's frames, with and without hires fix, and its fallback."""
from __future__ import annotations

from tests.integration import test_webui_api
from tests.integration.test_webui_api import difference, image_bytes, pixels, storysync_args, txt2img

pytestmark = test_webui_api.pytestmark  # skipped without a running WebUI


def test_storysync_bli_in_lockstep_draws_the_prepass_images():
    """BLI's vanilla rows sampled beside the story's (``bli_lockstep``) instead of in a pre-pass: with an ancestral
    sampler (noise drawn at every step) the frames are the pre-pass's within rounding (the batch is twice as large),
    with and without hires fix, and with 1Prompt1Story's consolidated contexts (Combined with masked sharing); no
    note says a pre-pass ran; BLI off gives other frames; a plain run afterwards is unchanged. With an SDE sampler
    lock-step falls back to the pre-pass (the pre-pass run's pixels) and the infotext says why."""
    plain_before = image_bytes(txt2img(sampler_name="Euler a"))
    hires = dict(enable_hr=True, hr_scale=2, hr_upscaler="Latent", hr_second_pass_steps=2, denoising_strength=0.6,
                 hr_additional_modules=["Use same choices"])
    for extra in ({}, hires):
        runs = {name: txt2img(storysync_args(bli_steps=0.5, **values), sampler_name="Euler a", steps=6, **extra)
                for name, values in (("prepass", {"bli_strength": 1.0}), ("no_bli", {"bli_strength": 0.0}),
                                     ("lockstep", {"bli_strength": 1.0, "bli_lockstep": True}))}
        info = runs["lockstep"]["info"]["infotexts"][0]
        assert "Story BLI lock-step: True" in info and "Story BLI note" not in info
        apart = [max(abs(x - y) for x, y in zip(pixels(runs["lockstep"], i), pixels(runs["prepass"], i)))
                 for i in range(3)]
        close = [difference(pixels(runs["lockstep"], i), pixels(runs["prepass"], i)) for i in range(3)]
        bli = [difference(pixels(runs["no_bli"], i), pixels(runs["prepass"], i)) for i in range(3)]
        print(f"hires {bool(extra)}: lock-step against pre-pass, per frame max {apart}, mean {close}; "
              f"BLI off against on, mean: {bli}")
        # BLI reaches the pixels (little, with random weights: 0.008-0.1 here; [NC] frames share nothing, so BLI
        # leaves them as they are), and lock-step gives the pre-pass's frames, not BLI off's
        assert max(apart) <= 2 and max(bli) > 0 and sum(close) < sum(bli) / 4
    assert image_bytes(txt2img(sampler_name="Euler a")) == plain_before
    combined = dict(preset="Combined", masked_sharing=True, csa_layers="up", bli_steps=0.5)  # consolidated contexts
    pair = [txt2img(storysync_args(**combined, bli_lockstep=on), steps=4) for on in (False, True)]
    assert "Story BLI note" not in pair[1]["info"]["infotexts"][0]
    assert max(max(abs(x - y) for x, y in zip(pixels(pair[0], i), pixels(pair[1], i))) for i in range(3)) <= 2
    sde = dict(sampler_name="DPM++ 2M SDE", steps=4)
    fallback = txt2img(storysync_args(bli_lockstep=True), **sde)
    assert "pre-pass instead of lock-step: the DPM++ 2M SDE sampler draws Brownian noise" in \
        fallback["info"]["infotexts"][0]
    assert pixels(fallback) == pixels(txt2img(storysync_args(), **sde))  # (the infotexts differ)
