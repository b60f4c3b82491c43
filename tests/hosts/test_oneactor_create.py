"""Creating a OneActor character in a WebUI, the parts that run without one: the request's validation, the
capture of the cond mid-block input (A1111 rows from the cursor, Forge rows from ``cond_or_uncond``), the frozen
and checkpointed UNet the tuning backpropagates through (left exactly as it was), the ε denoiser with Δ on the
base-word rows, and Forge's η2 post-CFG function."""
from __future__ import annotations

import importlib
import types

import pytest
import torch

from lib_consistency.common.row_layout import a1111_step_plan
from lib_consistency.oneactor.request import CreateRequest, CreateRequestError
from tests.fake_webui import install_stub_modules


class Block(torch.nn.Module):
    """An ldm ``TimestepEmbedSequential``-shaped block: ``forward(h, emb, context, transformer_options={})``."""

    def __init__(self, cin: int, cout: int, context_dim: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
        self.gate = torch.nn.Linear(context_dim, cout)

    def forward(self, h, emb, context=None, transformer_options=None):
        scale = self.gate(context).mean(1)[:, :, None, None]
        return torch.tanh(self.conv(h)) * (1 + scale)


class TinyLdmUNet(torch.nn.Module):
    def __init__(self, context_dim: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.input_blocks = torch.nn.ModuleList([Block(4, 8, context_dim), Block(8, 8, context_dim)])
        self.middle_block = Block(8, 8, context_dim)
        self.output_blocks = torch.nn.ModuleList([Block(8, 8, context_dim)])
        self.out = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x, timesteps=None, context=None, y=None, transformer_options=None):
        h = x
        for block in self.input_blocks:
            h = block(h, None, context)
        h = self.middle_block(h, None, context, transformer_options or {})
        for block in self.output_blocks:
            h = block(h, None, context)
        return self.out(h)


@pytest.fixture
def create(monkeypatch):
    install_stub_modules(monkeypatch)
    return importlib.import_module("lib_consistency.hosts.oneactor.create")


def snapshot(unet):
    return ([(name, p, p.requires_grad, p.is_inference()) for name, p in unet.named_parameters()],
            [name for name, m in unet.named_modules() if "forward" in m.__dict__])


def test_trainable_through_freezes_checkpoints_and_restores_everything(create):
    unet = TinyLdmUNet()
    before = snapshot(unet)
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 6, requires_grad=True)
    plain = unet(x, context=context)
    (grad_plain,) = torch.autograd.grad(plain.square().sum(), context)
    with create._trainable_through(unet):
        assert not any(p.requires_grad for p in unet.parameters())
        assert all("forward" in block.__dict__ for block in [*unet.input_blocks, unet.middle_block])
        out = unet(x, context=context)
        (grad,) = torch.autograd.grad(out.square().sum(), context)
    assert torch.equal(out, plain)
    assert torch.allclose(grad, grad_plain, rtol=1e-5, atol=1e-6)
    after = snapshot(unet)
    assert [(n, id(p), g, i) for n, p, g, i in after[0]] == [(n, id(p), g, i) for n, p, g, i in before[0]]
    assert after[1] == before[1] == []


def test_trainable_through_is_undone_when_tuning_fails(create):
    unet = TinyLdmUNet()
    before = snapshot(unet)
    with pytest.raises(RuntimeError, match="simulated"):
        with create._trainable_through(unet):
            raise RuntimeError("simulated out of memory")
    assert [(n, id(p), g) for n, p, g, _ in snapshot(unet)[0]] == [(n, id(p), g) for n, p, g, _ in before[0]]
    assert snapshot(unet)[1] == []


def test_inference_tensor_weights_become_equal_normal_tensors(create):
    with torch.inference_mode():  # how Forge loads its UNet
        unet = TinyLdmUNet()
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 6, requires_grad=True)
    with torch.no_grad():
        before_out = unet(x, context=context)
    values = {name: p.clone() for name, p in unet.named_parameters()}
    with create._trainable_through(unet):
        unet(x, context=context).sum().backward()  # would raise "Inference tensors cannot be saved for backward"
        assert context.grad is not None and context.grad.abs().sum() > 0
    assert not any(p.is_inference() for p in unet.parameters())
    assert all(torch.equal(p, values[name]) for name, p in unet.named_parameters())
    with torch.no_grad():
        assert torch.equal(unet(x, context=context), before_out)


def test_a1111_capture_keeps_the_cond_rows_of_the_last_call(create):
    unet = TinyLdmUNet()
    capture = create.Capture(forge=False, batch=2)
    p = types.SimpleNamespace(iteration=1)  # second batch: frames 2 and 3
    seen = []
    probe = unet.middle_block.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    handles = create._capture_hooks(p, unet, capture)
    for step in range(2):
        capture.cursor.start_step(a1111_step_plan([1, 1], 2))
        unet(torch.randn(4, 4, 8, 8), context=torch.randn(4, 5, 6))  # rows [cond 2, cond 3, uncond 2, uncond 3]
    for handle in handles:
        handle.remove()
    probe.remove()
    assert sorted(capture.features) == [2, 3]
    assert torch.equal(capture.features[2], seen[-1][0]) and torch.equal(capture.features[3], seen[-1][1])
    assert not unet._forward_pre_hooks and not unet.middle_block._forward_pre_hooks


def test_forge_capture_reads_cond_or_uncond(create):
    unet = TinyLdmUNet()
    capture = create.Capture(forge=True, batch=2)
    handles = create._capture_hooks(types.SimpleNamespace(iteration=0), unet, capture)
    h = torch.randn(4, 8, 8, 8)
    unet.middle_block(h, None, torch.randn(4, 5, 6), {"cond_or_uncond": [1, 0], "sigmas": torch.ones(2)})
    for handle in handles:
        handle.remove()
    assert torch.equal(capture.features[0], h[2]) and torch.equal(capture.features[1], h[3])


def test_denoiser_adds_each_rows_delta_on_its_base_word_rows_only(create):
    unet = TinyLdmUNet()
    contexts = {"a hobbit": (torch.randn(5, 6), None, (2,)), "two hobbit friends": (torch.randn(5, 6), None, (1, 3))}
    denoise = create._denoiser(unet, lambda prompt: contexts[prompt])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    deltas = torch.randn(2, 6)
    expected = torch.stack([contexts["a hobbit"][0], contexts["two hobbit friends"][0]]).clone()
    expected[0, 2] += deltas[0]
    expected[1, 1] += deltas[1]
    expected[1, 3] += deltas[1]
    assert torch.allclose(denoise(x, t, ["a hobbit", "two hobbit friends"], deltas), unet(x, context=expected))
    zero = denoise(x, t, ["a hobbit", "two hobbit friends"], torch.zeros(2, 6))
    assert torch.equal(zero, unet(x, context=torch.stack([contexts["a hobbit"][0],
                                                           contexts["two hobbit friends"][0]])))


def test_forge_post_cfg_subtracts_eta2_times_the_average_row(monkeypatch):
    install_stub_modules(monkeypatch)
    forge = importlib.import_module("lib_consistency.hosts.forge")
    calls = []

    def calc_batch(model, cond, uncond, x, sigma, options):
        calls.append(cond)
        return x * 0 + 3.0, None

    def compile_conditions(cond):
        return [{"model_conds": {"c_crossattn": cond}}]

    pending = {"context": torch.ones(1, 77, 8), "vector": None, "batch": types.SimpleNamespace(eta2=0.5)}
    post = forge.oneactor_post_cfg(lambda: pending, calc_batch, compile_conditions)
    args = {"denoised": torch.full((1, 4, 2, 2), 2.0), "uncond_denoised": torch.full((1, 4, 2, 2), 1.0),
            "cond": [{"control": "cn", "model_conds": {"c_concat": "image"}}], "input": torch.zeros(1, 4, 2, 2),
            "sigma": torch.ones(1), "model": None, "model_options": {}}
    assert torch.equal(post(args), torch.full((1, 4, 2, 2), 2.0 - 0.5 * (3.0 - 1.0)))
    assert calls[0][0]["control"] == "cn" and calls[0][0]["model_conds"]["c_concat"] == "image"
    assert post({**args, "uncond_denoised": None}) is args["denoised"]  # CFG 1: no uncond, no η2 term
    pending = None
    assert post(args) is args["denoised"]  # outside the window


def test_request_defaults_sizes_and_validation():
    request = CreateRequest.from_dict({"name": "Hero 1", "prompt": "a photo of a hobbit, red cloak",
                                       "base_word": "hobbit", "cfg_scale": 8})
    assert (request.auxiliaries, request.tuning_steps, request.steps, request.cfg_scale) == (10, 200, 30, 8.0)
    assert request.size("sdxl") == (1024, 1024) and request.size("sd15") == (512, 512)
    assert CreateRequest("x", "a hobbit", "hobbit", width=768).size("sd15") == (768, 512)


@pytest.mark.parametrize("body, message", [
    ({"prompt": "a hobbit", "base_word": "hobbit"}, "field 'name': is required"),
    ({"name": "x", "prompt": "a hobbit", "base_word": "dwarf"}, "field 'base_word': 'dwarf' does not occur"),
    ({"name": "x", "prompt": "a hobbit", "base_word": "two words"}, "field 'base_word': 'two words' must be one"),
    ({"name": "../x", "prompt": "a hobbit", "base_word": "hobbit"}, "field 'name'"),
    ({"name": "Con", "prompt": "a hobbit", "base_word": "hobbit"}, "field 'name': invalid OneActor character name "
                                                                   "'Con': 'Con' is a device name Windows reserves"),
    ({"name": "lpt1.v2", "prompt": "a hobbit", "base_word": "hobbit"}, "field 'name'.*'lpt1' is a device name"),
    ({"name": "x", "prompt": "a hobbit", "base_word": "hobbit", "steps": "30"}, "field 'steps': expected int"),
    ({"name": "x", "prompt": "a hobbit", "base_word": "hobbit", "auxiliaries": 0}, "'auxiliaries': 0 is out of"),
    ({"name": "x", "prompt": "a hobbit", "base_word": "hobbit", "width": 300}, "'width': 300 must be 0"),
    ({"name": "x", "prompt": "a hobbit", "base_word": "hobbit", "colour": 1}, "field 'colour': unknown key"),
    ({"name": "x", "prompt": " ", "base_word": "hobbit"}, "field 'prompt': must not be empty"),
    ({"name": "x", "prompt": "a hobbit", "base_word": "hobbit", "human": "yes"}, "field 'human': expected bool"),
    (["name"], "field 'body': expected a JSON object"),
])
def test_bad_requests_name_the_field(body, message):
    with pytest.raises(CreateRequestError, match=message.replace("(", r"\(").replace("[", r"\[")):
        CreateRequest.from_dict(body)
