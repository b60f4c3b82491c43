"""Metric properties of ``lib_consistency.evaluate`` with a tiny randomly initialised CLIP (no weights, no network):
CLIP-T against a float64 recomputation, CLIP-I of identical images, pair averaging, DreamSim only when installed."""
from __future__ import annotations

import copy
import importlib.util
import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lib_consistency.evaluate.infotext import EvaluationError, Frame, StoryImages
from lib_consistency.evaluate.metrics import (clip_score, clip_t_text, mean_pair_distance, mean_pair_similarity,
                                              pair_cosines)
from lib_consistency.evaluate.models import Optional, load_clip, load_dreamsim, on_noise
from lib_consistency.evaluate.scoring import Evaluator, StoryScores, overall

PROMPTS = ["a red fox runs in the snow", "a red fox sleeps in a log", "a red fox swims in a lake",
           "a red fox eats a berry", "a red fox looks at the moon", "a red fox jumps over a fence"]


def noise_image(seed: int, size: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def clip(tiny_clip_path):
    embedder, _ = load_clip(str(tiny_clip_path), allow_download=False, device="cpu")
    return embedder


def test_clip_t_equals_a_float64_recomputation(clip):
    images = [noise_image(i) for i in range(len(PROMPTS))]
    texts = [clip_t_text(p) for p in PROMPTS]

    model = copy.deepcopy(clip.model).double()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # transformers builds CLIP's causal mask in the default dtype
    try:
        with torch.no_grad():
            pixels = clip.processor(images=images, return_tensors="pt")["pixel_values"].double()
            tokens = clip.processor(text=texts, return_tensors="pt", padding=True)
            image_emb = model.get_image_features(pixel_values=pixels)
            text_emb = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    finally:
        torch.set_default_dtype(default)
    assert torch.allclose(clip.images(images).double(), image_emb, atol=1e-5)
    assert torch.allclose(clip.texts(texts).double(), text_emb, atol=1e-5)
    positive = 0
    for sign in (1.0, -1.0):  # a random CLIP's cosines often share one sign: both signs reach the unclamped branch
        expected = []
        for a, b in zip(image_emb.tolist(), (sign * text_emb).tolist()):
            cos = sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
            expected.append(2.5 * max(cos, 0.0))
        got = clip_score(clip.images(images), sign * clip.texts(texts))
        assert got.dtype == torch.float64
        assert got.tolist() == pytest.approx(expected, abs=1e-5)
        positive += sum(v > 0 for v in expected)
    assert positive >= len(PROMPTS)  # every frame's cosine is non-zero: one of the signs scored it


def test_clip_t_reads_the_recipe_prefix_without_webui_syntax():
    assert clip_t_text("<lora:style:0.8> a (red:1.2) fox,  BREAK in snow") == "A photo depicts a red fox, in snow"


def test_clip_score_clamps_negative_cosines_to_zero_and_weights_by_2_5():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    text = torch.tensor([[-1.0, 0.0], [2.0, 0.0], [4.0, 3.0]])
    assert clip_score(image, text).tolist() == pytest.approx([0.0, 2.5, 2.5 * 24 / 25])


def test_clip_i_of_identical_images_is_one(clip):
    image = noise_image(7)
    embeddings = clip.images([image, image.copy(), image.copy()])
    assert mean_pair_similarity(embeddings) == pytest.approx(1.0, abs=1e-6)
    assert mean_pair_distance(embeddings) == pytest.approx(0.0, abs=1e-6)
    different = clip.images([noise_image(1), noise_image(2)])
    assert mean_pair_similarity(different) < 1 - 1e-4


@pytest.mark.parametrize("frames", [5, 6, 7, 8, 9, 10])
def test_pair_averaging_equals_a_loop_over_all_unordered_pairs(frames):
    embeddings = torch.randn(frames, 12, generator=torch.Generator().manual_seed(frames))
    naive = []
    for i, j in itertools.combinations(range(frames), 2):
        a, b = embeddings[i].double(), embeddings[j].double()
        naive.append(float(a @ b / (a.norm() * b.norm())))
    assert len(pair_cosines(embeddings)) == frames * (frames - 1) // 2
    assert pair_cosines(embeddings).tolist() == pytest.approx(naive, abs=1e-12)
    assert mean_pair_similarity(embeddings) == pytest.approx(sum(naive) / len(naive), abs=1e-12)
    assert mean_pair_distance(embeddings) == pytest.approx(sum(1 - c for c in naive) / len(naive), abs=1e-12)


def test_pairs_need_two_frames():
    with pytest.raises(ValueError, match="at least 2 frames"):
        mean_pair_similarity(torch.ones(1, 4))


def test_overall_weights_clip_t_by_frame_and_identity_metrics_by_story():
    a = StoryScores("a", (1.0, 1.0, 1.0, 1.0), 0.5, None)
    b = StoryScores("b", (0.0, 0.0), 1.0, 0.2)
    total = overall([a, b])
    assert (total.frames, total.stories) == (6, 2)
    assert total.clip_t == pytest.approx(4 / 6) and total.clip_i == pytest.approx(0.75)
    assert total.dreamsim is None  # not every story has it: never a partial average
    assert overall([b, b]).dreamsim == pytest.approx(0.2)


def test_evaluator_scores_a_story_and_refuses_one_frame(clip, tmp_path):
    frames = []
    for i, prompt in enumerate(PROMPTS[:5]):
        path = tmp_path / f"{i}.png"
        noise_image(i).save(path)
        frames.append(Frame(path, prompt, {}))
    evaluator = Evaluator(clip, "tiny", Optional(None, "DreamSim: off"), Optional(None, "background removal: off"))
    scores = evaluator.score(StoryImages("s", frames))
    assert scores.frames == 5 and scores.dreamsim is None
    assert scores.clip_i == pytest.approx(mean_pair_similarity(clip.images([noise_image(i) for i in range(5)])))
    with pytest.raises(EvaluationError, match="1 frame"):
        evaluator.score(StoryImages("one", frames[:1]))


def test_background_noise_keeps_the_subject_and_replaces_the_rest():
    cut = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    cut.paste((200, 10, 10, 255), (0, 0, 4, 8))
    out = np.asarray(on_noise(cut, seed=3))
    assert (out[:, :4] == [200, 10, 10]).all()
    assert not (out[:, 4:] == 0).all() and np.array_equal(out, np.asarray(on_noise(cut, seed=3)))


def test_missing_clip_names_the_model_and_the_flag(tmp_path):
    with pytest.raises(EvaluationError, match=r"'no-such-org/no-such-clip': no such folder.*--allow-download"):
        load_clip("no-such-org/no-such-clip", allow_download=False, device="cpu")
    with pytest.raises(EvaluationError, match="config.json missing"):
        load_clip(str(tmp_path), allow_download=False, device="cpu")


def test_dreamsim_is_off_or_an_error_when_the_package_is_absent(tmp_path):
    if importlib.util.find_spec("dreamsim") is not None:
        pytest.skip("dreamsim is installed; its absent-package path is not reachable")
    off = load_dreamsim("auto", tmp_path, allow_download=False, device="cpu")
    assert off.run is None and "dreamsim" in off.status and "evaluate/requirements.txt" in off.status
    with pytest.raises(EvaluationError, match="evaluate/requirements.txt"):
        load_dreamsim("on", tmp_path, allow_download=False, device="cpu")


def test_dreamsim_distance_of_identical_images_is_zero(tmp_path):
    pytest.importorskip("dreamsim")
    from lib_consistency.evaluate.models import DREAMSIM_CACHE
    loaded = load_dreamsim("auto", DREAMSIM_CACHE, allow_download=False, device="cpu")
    if loaded.run is None:
        pytest.skip(loaded.status)
    image = noise_image(5, 224)
    assert mean_pair_distance(loaded.run([image, image.copy()])) == pytest.approx(0.0, abs=1e-5)
