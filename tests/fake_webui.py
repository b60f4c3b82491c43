"""Small stand-ins for the A1111 host: a stub ``modules`` package, a toy ldm-style UNet and a processing object
whose ``sample`` drives the UNet the way ``CFGDenoiser.forward`` does (cond rows first, then uncond; one call).

Only what the adapter touches is modelled; everything else would fail loudly with AttributeError.
"""
from __future__ import annotations

import contextlib
import re
import sys
import types

import torch

MODULE_NAMES = ("modules", "modules.devices", "modules.extra_networks", "modules.images", "modules.processing",
                "modules.prompt_parser", "modules.sd_unet", "modules.shared", "modules.scripts",
                "modules.script_callbacks", "modules.rng", "modules.paths", "modules.ui_extra_networks",
                "modules.sd_samplers")
SAMPLER_OPTIONS = {"Euler": {}, "DPM++ 2M": {}, "DPM++ 2M SDE": {"brownian_noise": True}}  # sd_samplers' configs


def parse_prompt(text: str):
    """``extra_networks.parse_prompt``: ``<name:a:b>`` tags removed, returned as {name: [params with items]}."""
    found: dict = {}

    def take(match):
        found.setdefault(match.group(1), []).append(types.SimpleNamespace(items=match.group(2).split(":")))
        return ""
    return re.sub(r"<(\w+):([^>]+)>", take, text), found


def parse_prompts(prompts):
    """``extra_networks.parse_prompts``: every prompt's tags removed; the networks of the FIRST prompt only."""
    parsed = [parse_prompt(text) for text in prompts]
    return [text for text, _ in parsed], parsed[0][1]


class PromptStyles:
    """``shared.prompt_styles``: named style prompts merged like ``modules/styles.merge_prompts``."""

    def __init__(self) -> None:
        self.styles: dict[str, str] = {}

    def apply_styles_to_prompt(self, prompt, styles):
        for name in styles:
            style = self.styles[name]
            prompt = style.replace("{prompt}", prompt) if "{prompt}" in style else \
                ", ".join(part for part in (prompt.strip(), style.strip()) if part)
        return prompt


class ImageRNG:
    """``modules.rng.ImageRNG``: one generator per seed; ``next()`` draws the batch's noise and advances them."""

    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0,
                 seed_resize_from_w=0):
        self.shape, self.seeds, self.subseeds, self.subseed_strength = tuple(shape), seeds, subseeds, subseed_strength
        self.seed_resize_from_h, self.seed_resize_from_w = seed_resize_from_h, seed_resize_from_w
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    def next(self):
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])


def stub_modules() -> dict[str, types.ModuleType]:
    mods = {name: types.ModuleType(name) for name in MODULE_NAMES}
    mods["modules.devices"].autocast = contextlib.nullcontext
    mods["modules.devices"].dtype_unet = torch.float32
    mods["modules.extra_networks"].parse_prompt = parse_prompt
    mods["modules.extra_networks"].parse_prompts = parse_prompts
    mods["modules.extra_networks"].registry = {}
    mods["modules.extra_networks"].ExtraNetwork = type("ExtraNetwork", (), {
        "__init__": lambda self, name: setattr(self, "name", name)})
    mods["modules.extra_networks"].register_extra_network = \
        lambda network: mods["modules.extra_networks"].registry.__setitem__(network.name, network)
    mods["modules.ui_extra_networks"].extra_pages = []
    mods["modules.ui_extra_networks"].register_page = mods["modules.ui_extra_networks"].extra_pages.append
    mods["modules.ui_extra_networks"].quote_js = lambda text: '"' + text.replace('"', '\\"') + '"'
    mods["modules.ui_extra_networks"].ExtraNetworksPage = type("ExtraNetworksPage", (), {
        "__init__": lambda self, title: setattr(self, "name", title.lower()),
        "find_preview": lambda self, path: None, "search_terms_from_path": lambda self, path: path,
        "get_sort_keys": lambda self, path: {}})
    mods["modules.paths"].models_path = "models"
    mods["modules.images"].saved = []
    mods["modules.images"].saved_files = []  # (path, basename, seed, prompt, info, [generation_number]) per file

    def save_image(image, path, basename, seed=None, prompt=None, extension="png", info=None, p=None, **kwargs):
        mods["modules.images"].saved.append(image)
        number = p.iteration * p.batch_size + getattr(p, "batch_index", 0) + 1 if p is not None else None
        mods["modules.images"].saved_files.append((path, basename, seed, prompt, info, number))
    mods["modules.images"].save_image = save_image
    mods["modules.images"].image_grid = lambda imgs, batch_size=1, rows=None: ("grid", batch_size, list(imgs))
    mods["modules.processing"].create_infotext = \
        lambda p, prompts, seeds, subseeds, use_main_prompt=False, index=None, all_negative_prompts=None, **k: \
        f"{p.main_prompt if use_main_prompt else prompts[index]}\nSeed: {seeds[index]}"
    mods["modules.processing"].get_fixed_seed = lambda seed: 1234 if seed in (-1, None, "") else int(seed)

    class SdConditioning(list):
        def __init__(self, prompts, is_negative_prompt=False, width=None, height=None):
            super().__init__(prompts)
            self.width, self.height = width, height

    mods["modules.prompt_parser"].SdConditioning = SdConditioning
    mods["modules.prompt_parser"].get_learned_conditioning_prompt_schedules = \
        lambda prompts, steps: [[[steps, text]] if not re.search(r"\[[^\]]*:[^\]]*:[^\]]*\]", text)
                                else [[1, text], [steps, text]] for text in prompts]
    mods["modules.sd_unet"].current_unet = None
    opts = types.SimpleNamespace(data={}, skip_early_cond=0.0, s_min_uncond_all=False, grid_save=False,
                                 grid_format="png", samples_save=True, samples_format="png",
                                 save_incomplete_images=False, return_grid=True, grid_only_if_multiple=True,
                                 enable_pnginfo=False, grid_extended_filename=False)
    mods["modules.shared"].opts = opts
    mods["modules.shared"].prompt_styles = PromptStyles()
    mods["modules.shared"].state = types.SimpleNamespace(sampling_step=0, sampling_steps=0, current_latent=None,
                                                         current_image_sampling_step=0, interrupted=False,
                                                         skipped=False)
    mods["modules.shared"].total_tqdm = types.SimpleNamespace(update=lambda: None)
    mods["modules.rng"].ImageRNG = ImageRNG
    mods["modules.sd_samplers"].find_sampler_config = \
        lambda name: types.SimpleNamespace(options=SAMPLER_OPTIONS[name]) if name in SAMPLER_OPTIONS else None
    mods["modules.scripts"].Script = type("Script", (), {})
    mods["modules.scripts"].AlwaysVisible = object()
    for name in MODULE_NAMES[1:]:
        setattr(mods["modules"], name.split(".")[1], mods[name])
    return mods


class ToyAttention(torch.nn.Module):
    """ldm ``CrossAttention``: ``forward(x, context=None, mask=None)``; keys/values from ``context`` or ``x``."""

    def __init__(self, dim: int, context_dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = torch.nn.Linear(dim, dim, bias=False)
        self.to_k = torch.nn.Linear(context_dim, dim, bias=False)
        self.to_v = torch.nn.Linear(context_dim, dim, bias=False)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.Dropout(0.0))

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        rows = x.shape[0]

        def split(t):
            return t.view(rows, t.shape[1], self.heads, -1).transpose(1, 2)

        out = torch.nn.functional.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(context)),
                                                               split(self.to_v(context)))
        return self.to_out(out.transpose(1, 2).reshape(rows, x.shape[1], -1))


class ToyBlock(torch.nn.Module):
    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = ToyAttention(dim, dim)
        self.attn2 = ToyAttention(dim, context_dim)

    def forward(self, h, context):
        h = self.attn1(h) + h
        return self.attn2(h, context=context) + h


class ToyTransformer(torch.nn.Module):
    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([ToyBlock(dim, context_dim)])

    def forward(self, x, context):
        b, c, height, width = x.shape
        h = x.flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            h = block(h, context)
        return h.transpose(1, 2).reshape(b, c, height, width)


class Downsample(torch.nn.Identity):
    """Marks a level change like ldm's ``Downsample`` / ``Upsample`` blocks (the toy's forward pools itself)."""


class Upsample(torch.nn.Identity):
    pass


class ToyUNet(torch.nn.Module):
    """ldm names: input_blocks.1.1 at the latent size, middle_block.1 at latent/4 (StorySync's mask level),
    output_blocks.3.1 at latent/2 (image/16), in that order; Downsample/Upsample blocks where ldm has them."""

    def __init__(self, channels: int = 8, context_dim: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.input_blocks = torch.nn.ModuleList([torch.nn.Conv2d(4, channels, 1),
                                                 torch.nn.ModuleList([torch.nn.Identity(),
                                                                      ToyTransformer(channels, context_dim)]),
                                                 torch.nn.ModuleList([Downsample()]),
                                                 torch.nn.ModuleList([Downsample()])])
        self.middle_block = torch.nn.ModuleList([torch.nn.Identity(), ToyTransformer(channels, context_dim)])
        self.output_blocks = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.ModuleList([Upsample()]),
                                                  torch.nn.Identity()] + [
            torch.nn.ModuleList([torch.nn.Identity(), ToyTransformer(channels, context_dim)])])
        self.out = torch.nn.Conv2d(channels, 4, 1)

    def forward(self, x, timesteps=None, context=None):
        h = self.input_blocks[1][1](self.input_blocks[0](x), context)
        mid = self.middle_block[1](torch.nn.functional.avg_pool2d(h, 4), context)
        low = torch.nn.functional.avg_pool2d(h, 2) + torch.nn.functional.interpolate(mid, scale_factor=2.0)
        low = self.output_blocks[3][1](low, context)
        return self.out(h + torch.nn.functional.interpolate(low, size=h.shape[-2:]))


class ToyTextModel:
    """``cond_stage_model``/``get_learned_conditioning`` of an SD1 model over a tiny real CLIP text encoder."""

    def __init__(self, tokenizer, encoder) -> None:
        self.tokenizer, self.encoder = tokenizer, encoder

    def tokenize_line(self, text):
        """A1111's ``(chunks, token_count)``: 75 content tokens per chunk between SOT and EOT, no emphasis."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        chunks = []
        for start in range(0, max(len(ids), 1), 75):
            content = ids[start:start + 75]
            tokens = [49406] + content + [49407] * (76 - len(content))
            chunks.append(types.SimpleNamespace(tokens=tokens, multipliers=[1.0] * 77, fixes=[]))
        return chunks, len(ids)

    def encode(self, texts):
        ids = self.tokenizer(list(texts), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return self.encoder(ids).last_hidden_state


class ToyModel:
    def __init__(self, tokenizer, encoder) -> None:
        self.is_sd1, self.is_sdxl = True, False
        self.model = types.SimpleNamespace(diffusion_model=ToyUNet(context_dim=encoder.config.hidden_size))
        self.cond_stage_model = ToyTextModel(tokenizer, encoder)
        self.encoded_texts: list[str] = []
        self.active_networks: tuple[str, ...] = ()  # set by ToyProcessing.run_batches like extra_networks.activate
        self.encoded_under: list[tuple[str, ...]] = []  # the networks active at each encoder call

    def get_learned_conditioning(self, texts):
        self.encoded_texts += list(texts)
        self.encoded_under.append(self.active_networks)
        return self.cond_stage_model.encode(texts)


class ToyProcessing:
    """The parts of ``StableDiffusionProcessing`` the adapter reads, plus an A1111-shaped sampling loop."""

    def __init__(self, model: ToyModel, prompt: str = "watercolor", steps: int = 3) -> None:
        self.sd_model, self.prompt, self.negative_prompt = model, prompt, ""
        self.seed, self.batch_size, self.n_iter, self.iteration, self.steps = -1, 1, 1, 0, steps
        self.enable_hr, self.is_hr_pass, self.width, self.height = False, False, 64, 64
        self.styles: list[str] = []
        self.all_prompts = None  # set by setup_prompts, like the host before any script's process
        self.extra_generation_params: dict = {}
        self.do_not_save_grid, self.outpath_grids, self.main_prompt = True, "", prompt
        self.closed = False
        self.seen_conds: list[torch.Tensor] = []
        self.rng = None  # set per batch like process_images_inner; None: fixed noise
        self.prompts = None  # the batch's prompts, set per batch by process_images (None: sliced from self.prompt)
        self.do_not_save_samples, self.outpath_samples = False, "samples"
        self.subseed_strength, self.seed_resize_from_h, self.seed_resize_from_w = 0.0, 0, 0
        self.drawn: list[tuple[list[str], list[int], tuple[str, ...]]] = []  # per batch: prompts, seeds, networks
        # (the prompts with their tags, as the host parses them; the networks it activated)

    def close(self):
        self.closed = True

    def setup_prompts(self):
        """``StableDiffusionProcessing.setup_prompts`` and the seeds of ``process_images_inner``."""
        from modules import shared
        prompts = self.prompt if isinstance(self.prompt, list) else [self.prompt] * (self.batch_size * self.n_iter)
        self.all_prompts = [shared.prompt_styles.apply_styles_to_prompt(text, self.styles) for text in prompts]
        self.all_seeds = list(self.seed) if isinstance(self.seed, list) else \
            [int(self.seed) + i for i in range(len(self.all_prompts))]

    def run_batches(self, on_cfg_denoiser, scripts_process=None):
        """``process_images_inner`` from ``setup_prompts``: every script's ``process``, then per batch the networks
        of the batch's first prompt activated (``extra_networks.parse_prompts``) and ``sample``."""
        from modules import extra_networks
        self.setup_prompts()
        if scripts_process is not None:
            scripts_process(self)
        outputs = []
        for n in range(self.n_iter):
            self.iteration = n
            _, networks = extra_networks.parse_prompts(self.all_prompts[n * self.batch_size:][:self.batch_size])
            self.sd_model.active_networks = tuple(sorted(f"<{kind}:{':'.join(params.items)}>"
                                                         for kind, found in networks.items() for params in found))
            outputs.append(self.sample(on_cfg_denoiser))
        return outputs

    def process_images(self, pipeline):
        """``process_images_inner`` from ``setup_prompts`` with the story's hooks (hosts.md §1.2): per batch the
        host's slices of ``all_*`` at ``n * batch_size``, ``p.rng`` from the slice's seeds, ``before_process_batch``,
        the networks of the batch's first prompt (``parse_prompts``), ``process_batch``, ``sample``, the slices of
        the prompts again, ``postprocess_batch_list``, then each image's infotext from ``p.prompts``/``p.seeds``,
        saved unless ``do_not_save_samples``; the grid unless ``do_not_save_grid``; then ``postprocess``. Images
        are the batch's final latents [4, 8, 8]; returns a ``Processed``-like namespace."""
        from modules import extra_networks, images, rng, shared
        self.setup_prompts()
        self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)
        self.all_subseeds = [1000 + i for i in range(len(self.all_prompts))]
        pipeline.process(self)
        output, infotexts = [], []
        for n in range(self.n_iter):
            self.iteration, part = n, slice(n * self.batch_size, (n + 1) * self.batch_size)
            self.prompts, self.negative_prompts = self.all_prompts[part], self.all_negative_prompts[part]
            self.seeds, self.subseeds = self.all_seeds[part], self.all_subseeds[part]
            self.rng = rng.ImageRNG((4, 8, 8), self.seeds, subseeds=self.subseeds)
            pipeline.before_process_batch(self)
            if not self.prompts:
                break
            drawn = list(self.prompts)
            self.prompts, networks = extra_networks.parse_prompts(self.prompts)
            self.sd_model.active_networks = tuple(sorted(f"<{kind}:{':'.join(params.items)}>"
                                                         for kind, found in networks.items() for params in found))
            self.drawn.append((drawn, list(self.seeds), self.sd_model.active_networks))
            pipeline.process_batch(self)
            latents = self.sample(pipeline.on_cfg_denoiser)
            self.prompts, self.negative_prompts = self.all_prompts[part], self.all_negative_prompts[part]
            pipeline.postprocess_batch_list(self)
            for i, latent in enumerate(latents):
                self.batch_index = i
                info = f"{self.prompts[i]}\nSeed: {self.seeds[i]}"
                if shared.opts.samples_save and not self.do_not_save_samples:
                    images.save_image(latent, self.outpath_samples, "", self.seeds[i], self.prompts[i], "png",
                                      info=info, p=self)
                output.append(latent)
                infotexts.append(info)
        first = 0
        if shared.opts.return_grid and not self.do_not_save_grid and len(output) > 1:
            output.insert(0, images.image_grid(output, self.batch_size))
            infotexts.insert(0, f"{self.main_prompt}\nSeed: {self.all_seeds[0]}")
            first = 1
        processed = types.SimpleNamespace(images=output, infotexts=infotexts, index_of_first_image=first,
                                          info=infotexts[0], seed=self.all_seeds[0])
        pipeline.postprocess(self, processed)
        return processed

    def sample(self, on_cfg_denoiser, fail_at_step: int | None = None):
        """One batch: ``steps`` denoiser calls, each one UNet call of 2B rows [cond ; uncond] (batch_cond_uncond)."""
        prompts = self.prompts if self.prompts is not None else \
            self.prompt[self.iteration * self.batch_size:][:self.batch_size] \
            if isinstance(self.prompt, list) else [self.prompt] * self.batch_size
        model, unet = self.sd_model, self.sd_model.model.diffusion_model
        cond, uncond = model.cond_stage_model.encode(prompts), model.cond_stage_model.encode([""] * len(prompts))
        x = self.rng.next() if self.rng is not None else \
            torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))
        denoiser = types.SimpleNamespace(p=self, step=0, total_steps=self.steps)
        for step in range(self.steps):
            if fail_at_step == step:
                raise RuntimeError("out of memory (simulated)")
            params = types.SimpleNamespace(x=x, sigma=torch.full((len(prompts),), 10.0 - step), sampling_step=step,
                                           total_sampling_steps=self.steps, text_cond=cond, text_uncond=uncond,
                                           denoiser=denoiser)
            on_cfg_denoiser(params)
            self.seen_conds.append(params.text_cond)
            out = unet(torch.cat([x, x]), None, context=torch.cat([params.text_cond, params.text_uncond]))
            x = x - 0.1 * out[:len(prompts)]
            denoiser.step += 1
        return x


def install_stub_modules(monkeypatch) -> dict[str, types.ModuleType]:
    mods = stub_modules()
    for name, module in mods.items():
        monkeypatch.setitem(sys.modules, name, module)
    for name in [n for n in sys.modules if n.startswith("lib_consistency.hosts.")]:
        monkeypatch.delitem(sys.modules, name)
        parent, _, child = name.rpartition(".")  # ``from . import child`` takes the package's attribute first
        if hasattr(sys.modules.get(parent), child):
            monkeypatch.delattr(sys.modules[parent], child)
    return mods
