"""A stand-in for another extension that takes Consistent Story's attention away (opt-in integration tests only).

Link this folder into a test WebUI's ``extensions/`` under a name sorted after the extension's own folder (e.g.
``zz-consistent-story-breaker``). It acts only on jobs whose prompt contains ``BREAKSTORYPATCHES``:
- Forge, Forge Neo: its ``process_before_every_sampling`` (after ours) assigns a fresh clone of the batch's UNet
  patcher, dropping every patch registered on the one we assigned, as an extension that clones the wrong patcher
  would;
- A1111: at the second step it puts a one-shot instance ``forward`` over the first attention module that carries one
  of our hooks, bypassing it for one call, as an extension that wraps attention modules would.
The story must then fail with its message instead of returning frames drawn without its methods.
"""
from modules import script_callbacks, scripts

MARK = "BREAKSTORYPATCHES"


def _marked(p) -> bool:
    prompts = p.prompt if isinstance(p.prompt, list) else [p.prompt]
    return any(MARK in str(text) for text in prompts)


class ConsistentStoryBreaker(scripts.Script):
    sorting_priority = 10_000

    def title(self):
        return "Consistent Story breaker (test)"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return []  # no controls, but listed by /sdapi/v1/script-info (the tests look for it there)

    def process_before_every_sampling(self, p, *args, **kwargs):
        forge = getattr(p.sd_model, "forge_objects", None)
        if forge is not None and _marked(p):
            forge.unet = p.sd_model.forge_objects_after_applying_lora.unet.clone()


def _bypass_once(module):
    def forward(*args, **kwargs):
        del module.forward  # one call only; the module is left without any instance forward
        return type(module).forward(module, *args, **kwargs)
    module.forward = forward


def on_cfg_denoiser(params):
    p = getattr(params.denoiser, "p", None)
    if p is None or hasattr(p.sd_model, "forge_objects") or not _marked(p) or params.sampling_step != 1:
        return
    for _, module in p.sd_model.model.diffusion_model.named_modules():
        if type(module.__dict__.get("forward")).__name__.endswith("Hook"):
            _bypass_once(module)
            return


script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
