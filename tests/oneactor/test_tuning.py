"""OneActor tuning (methods.md §6.2–6.3) through a real, tiny, frozen diffusers UNet; the tuning bench code path.

The test denoiser builds a context from a fixed random embedding per word (plus one per position) and adds each
row's Δ at the base word's position, like a host adding Δ to the base-word token embedding.
"""
from __future__ import annotations

import math

import pytest
import torch

from lib_consistency.oneactor import tuning as T
from lib_consistency.oneactor.projector import ProjectorSpec, build_projector

diffusers = pytest.importorskip("diffusers")

WIDTH, TOKENS, WORD = 16, 12, "dog"
SPEC = ProjectorSpec("sd15", 8, 8, WIDTH, (16, 8, 8))
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=WIDTH, norm_num_groups=8,
                 attention_head_dim=8)
SCHEDULE = torch.linspace(0.999, 0.01, 1000)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**TINY_UNET).eval().requires_grad_(False)


class WordDenoiser:
    """denoise(x_t, t, prompts, deltas) = the UNet's ε for the prompt's context with Δ at the base word.
    target_delta: also subtract the UNet's ε for that fixed Δ and add x_t (a fixed target Δ can match, see
    test_loss_falls_when_delta_can_match_a_fixed_target)."""

    def __init__(self, unet, target_delta=None):
        self.unet, self.target_delta, self.calls = unet, target_delta, []
        self.vocabulary = sorted({w for t in T.GENERIC_TEMPLATES + T.HUMAN_TEMPLATES for w in t.format(WORD).split()})
        generator = torch.Generator().manual_seed(3)
        self.words = torch.randn(len(self.vocabulary), WIDTH, generator=generator)
        self.positions = 0.1 * torch.randn(TOKENS, WIDTH, generator=generator)

    def context(self, prompts, deltas):
        embedded, at_word = self.positions.repeat(len(prompts), 1, 1), torch.zeros(len(prompts), TOKENS, 1)
        for row, prompt in enumerate(prompts):
            words = prompt.split()
            embedded[row, :len(words)] += self.words[[self.vocabulary.index(w) for w in words]]
            at_word[row, words.index(WORD)] = 1
        return embedded + at_word * deltas[:, None, :]

    def __call__(self, x_t, timesteps, prompts, deltas):
        self.calls.append((x_t.detach().clone(), timesteps.clone(), list(prompts), deltas.detach().clone(),
                           torch.is_autocast_enabled("cpu")))
        eps = self.unet(x_t, timesteps, encoder_hidden_states=self.context(prompts, deltas)).sample
        if self.target_delta is None:
            return eps
        with torch.no_grad():
            fixed = self.context(prompts, self.target_delta.expand_as(deltas))
            fixed_eps = self.unet(x_t, timesteps, encoder_hidden_states=fixed).sample
        return x_t + eps - fixed_eps


def make_samples(count=6, seed=4):
    generator = torch.Generator().manual_seed(seed)
    return [T.TuningSample(torch.randn(4, 8, 8, generator=generator), torch.randn(8, 8, 8, generator=generator))
            for _ in range(count)]


def run(denoise, steps=3, samples=None, schedule=SCHEDULE, **config):
    samples = samples or make_samples()
    projector = build_projector(SPEC, 0)
    result = T.tune(projector, samples[0], samples[1:], denoise, schedule, WORD, T.TuningConfig(steps=steps, **config))
    return projector, result


def test_only_the_projector_trains_and_the_unet_is_untouched(unet):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    initial = build_projector(SPEC, 0).state_dict()
    projector, result = run(WordDenoiser(unet), lr=1e-2)
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert all(p.grad is None for p in unet.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert not torch.equal(initial["linear.weight"], projector.state_dict()["linear.weight"])
    assert result.steps == len(result.losses) == 3 and not projector.training


def test_loss_falls_when_delta_can_match_a_fixed_target(unet):
    """x_t + ε(Δ) − ε(Δ*) at ā ≈ 0 leaves only the UNet's response to Δ − Δ*: the loss can reach 0."""
    target_delta = 0.5 * torch.randn(WIDTH, generator=torch.Generator().manual_seed(9))
    _, result = run(WordDenoiser(unet, target_delta), steps=40, schedule=torch.full((1000,), 1e-8), lr=1e-2)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.3 * first


def test_batch_rows_follow_the_code(unet):
    """Rows: target, K distinct auxiliaries, then the average row = the target row with Δ_avg = mean of the K Δ's."""
    samples, k = make_samples(6), 3
    latents = [s.latent for s in samples]
    for flip in (0.0, 1.0):
        denoise = WordDenoiser(unet)
        run(denoise, steps=4, samples=samples, schedule=torch.ones(1000), hflip_p=flip)  # ā = 1: x_t = z0
        for x_t, timesteps, prompts, deltas, _ in denoise.calls:
            shown = [x.flip(-1) if flip else x for x in x_t]
            assert torch.equal(shown[0], latents[0]) and torch.equal(shown[-1], latents[0])
            picked = [next(i for i, z in enumerate(latents) if torch.equal(z, x)) for x in shown[1:-1]]
            assert len(set(picked)) == k and 0 not in picked
            assert prompts[-1] == prompts[0] and all(p in T.prompt_templates(WORD, False) for p in prompts)
            assert torch.allclose(deltas[-1], deltas[1:-1].mean(0), atol=1e-6)
            assert len(timesteps) == k + 2
    denoise = WordDenoiser(unet)
    run(denoise, steps=2, samples=samples, schedule=torch.full((1000,), 0.5))  # same ā everywhere
    for x_t, *_ in denoise.calls:  # the average row reuses the target's noise
        assert torch.equal(x_t[-1], x_t[0]) and not torch.equal(x_t[0], latents[0])


def test_result_is_eval_mode_target_and_mean_over_all_auxiliaries(unet):
    samples = make_samples(6)
    projector, result = run(WordDenoiser(unet), samples=samples)
    with torch.no_grad():
        phi = projector.eval()(torch.stack([s.features for s in samples]))
    assert torch.allclose(result.delta_tar, phi[0]) and torch.allclose(result.delta_avg, phi[1:].mean(0))


def full_batch_gradients(projector, batch, denoise, micro_batch):
    projector.zero_grad(set_to_none=True)
    features, x_t, timesteps, prompts, noise, weights = batch
    phi = projector(features)
    deltas = torch.cat([phi, phi[1:].mean(0, keepdim=True)])
    if micro_batch is None:  # reference: one denoiser call, one backward through the whole graph
        eps = denoise(x_t, timesteps, prompts, deltas)
        loss = (weights * ((eps.double() - noise.double()) ** 2).flatten(1).mean(1)).sum()
        loss.backward()
        loss = loss.item()
    else:
        loss = T.backward_rows(deltas, x_t, timesteps, prompts, noise, weights, denoise, micro_batch)
    return loss, [p.grad.clone() for p in projector.parameters()]


def test_micro_batches_give_the_unchunked_gradient(unet):
    generator = torch.Generator().manual_seed(5)
    features, x_t, noise = (torch.randn(4, 8, 8, 8, generator=generator), torch.randn(5, 4, 8, 8, generator=generator),
                            torch.randn(5, 4, 8, 8, generator=generator))
    prompts = T.prompt_templates(WORD, True)[:4] + T.prompt_templates(WORD, True)[:1]
    batch = (features, x_t, torch.tensor([5, 900, 40, 300, 77]), prompts, noise, T.row_weights(3, T.TuningConfig()))
    projector, denoise = build_projector(SPEC, 1), WordDenoiser(unet)
    reference_loss, reference = full_batch_gradients(projector, batch, denoise, None)
    for micro_batch in (1, 2, 5):
        loss, grads = full_batch_gradients(projector, batch, denoise, micro_batch)
        assert loss == pytest.approx(reference_loss, rel=1e-6)
        for grad, expected in zip(grads, reference):
            assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-6)
    assert [len(call[0]) for call in denoise.calls] == [5, 1, 1, 1, 1, 1, 2, 2, 1, 5]


def test_micro_batch_size_does_not_change_tuning(unet):
    (_, one), (_, five) = run(WordDenoiser(unet), micro_batch=1), run(WordDenoiser(unet), micro_batch=5)
    assert one.losses == pytest.approx(five.losses, rel=1e-5)
    assert torch.allclose(one.delta_tar, five.delta_tar, atol=1e-4)


def test_should_stop_before_the_first_step(unet):
    projector, calls = build_projector(SPEC, 0), []
    initial = {k: v.clone() for k, v in projector.state_dict().items()}
    samples = make_samples()
    with pytest.raises(T.TuningInterrupted) as stopped:
        T.tune(projector, samples[0], samples[1:], WordDenoiser(unet), SCHEDULE, WORD, T.TuningConfig(steps=3),
               progress=lambda *a: calls.append(a), should_stop=lambda: True)
    assert stopped.value.step == 0 and calls == []
    assert all(torch.equal(initial[k], v) for k, v in projector.state_dict().items())


def test_should_stop_mid_run(unet):
    calls, samples = [], make_samples()
    with pytest.raises(T.TuningInterrupted) as stopped:
        T.tune(build_projector(SPEC, 0), samples[0], samples[1:], WordDenoiser(unet), SCHEDULE, WORD,
               T.TuningConfig(steps=5), progress=lambda *a: calls.append(a), should_stop=lambda: len(calls) == 2)
    assert stopped.value.step == 2 and [c[:2] for c in calls] == [(1, 5), (2, 5)]


def test_same_seed_same_result_other_seed_differs(unet):
    (_, first), (_, second) = run(WordDenoiser(unet)), run(WordDenoiser(unet))
    assert first.losses == second.losses and torch.equal(first.delta_tar, second.delta_tar)
    assert torch.equal(first.delta_avg, second.delta_avg)
    assert run(WordDenoiser(unet), seed=1)[1].losses != first.losses


def test_autocast_wraps_only_the_denoiser(unet):
    denoise = WordDenoiser(unet)
    _, result = run(denoise, steps=1, autocast_dtype=torch.bfloat16)
    assert all(call[-1] for call in denoise.calls) and math.isfinite(result.losses[0])
    assert result.delta_tar.dtype == torch.float32


@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("lr", 0.0), ("weight_decay", -1.0), ("betas", (0.9, 1.0)), ("aux_per_step", 0),
    ("lambda_aux", -0.1), ("lambda_avg", -0.1), ("hflip_p", 1.5), ("seed", 1.5), ("micro_batch", 0),
    ("autocast_dtype", torch.float64)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(T.TuningError, match=f"TuningConfig.{field}:"):
        T.TuningConfig(**{field: value})


def test_bad_inputs_name_what_is_wrong(unet):
    samples, denoise = make_samples(), WordDenoiser(unet)
    with pytest.raises(T.TuningError, match="auxiliaries: need at least one"):
        T.tune(build_projector(SPEC, 0), samples[0], [], denoise, SCHEDULE, WORD)
    samples[2] = T.TuningSample(torch.zeros(4, 8, 6), samples[2].features)
    with pytest.raises(T.TuningError, match=r"auxiliaries\[1\].latent"):
        T.tune(build_projector(SPEC, 0), samples[0], samples[1:], denoise, SCHEDULE, WORD)
    with pytest.raises(T.TuningError, match="base_word"):
        T.prompt_templates("{}", False)
    with pytest.raises(T.TuningError, match="does not depend on deltas"):
        run(lambda x_t, t, prompts, deltas: x_t, steps=1)


def test_prompt_templates_hold_the_word():
    generic, human = T.prompt_templates("hobbit", False), T.prompt_templates("hobbit", True)
    assert len(generic) == len(human) == 10 and not set(generic) & set(human)
    assert all("hobbit" in p.split() for p in generic + human)


def test_add_noise_equals_a_float64_reference():
    generator = torch.Generator().manual_seed(6)
    z0, noise = torch.randn(3, 4, 5, 5, generator=generator), torch.randn(3, 4, 5, 5, generator=generator)
    betas = [0.00085 + (0.012 - 0.00085) * i / 999 for i in range(1000)]
    alphas = [math.prod(1 - b for b in betas[:i + 1]) for i in range(0, 1000, 1)]
    t = torch.tensor([0, 499, 999])
    x_t = T.add_noise(z0, noise, torch.tensor(alphas, dtype=torch.float32), t)
    for row, step in enumerate(t.tolist()):
        expected = math.sqrt(alphas[step]) * z0[row].double() + math.sqrt(1 - alphas[step]) * noise[row].double()
        assert torch.allclose(x_t[row].double(), expected, atol=1e-6)
    assert x_t.dtype == torch.float32


def test_tuning_bench_code_path_runs():
    from lib_consistency.bench.oneactor import run_tuning_bench
    lines = []
    bench = run_tuning_bench("sd15", "cpu", torch.float32, latent_side=8, unet_config=TINY_UNET,
                             projector_spec=SPEC, micro_batch=2, print_fn=lines.append)
    assert bench.timed_steps == 1 and bench.seconds_per_step > 0 and bench.peak_bytes > 0
    assert bench.estimate_seconds() == pytest.approx(200 * bench.seconds_per_step)
    assert len(lines) == 2 and "latent 8x8" in lines[0]


def test_inference_bench_reports_the_eta2_row_cost():
    from lib_consistency.bench.oneactor import run_inference_bench
    lines = []
    figures = run_inference_bench("sd15", "cpu", torch.float32, batch=2, latent_side=8, repeats=1,
                                  unet_config=TINY_UNET, print_fn=lines.append)
    assert figures["cfg_call"] > 0 and figures["extra_call"] > 0 and figures["offset"] > 0
    assert figures["eta2_positive"] == pytest.approx(
        1 + (2 / 3) * (figures["extra_call"] + figures["offset"]) / figures["cfg_call"])
    assert figures["eta2_positive"] > figures["eta2_zero"] > 1
    assert figures["eta2_folded"] == pytest.approx(
        1 + (2 / 3) * (figures["folded_call"] - figures["cfg_call"] + figures["offset"]) / figures["cfg_call"])
    assert len(lines) == 2 and "batch 2" in lines[0] and "folded" in lines[1]
