"""Shared fixtures: a real CLIP tokenizer built offline, tiny CLIP text encoders, the benchmark prompts.

The tokenizer is transformers' ``CLIPTokenizer`` over the real CLIP BPE merge list, which the test-only
package ``clip-anytorch`` ships as data (nothing is downloaded). Its vocabulary is rebuilt the way CLIP
defines it: 256 byte symbols, the same with the end-of-word marker, one entry per merge, then SOT and EOT.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONSISTORY_PLUS = ROOT.parent / "shared" / "1prompt1story" / "consistory_plus.yaml"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _clip_merges_path() -> pathlib.Path | None:
    spec = importlib.util.find_spec("clip")  # locates the package without importing it (it imports torchvision)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return path if path.exists() else None


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory):
    """The real CLIP tokenizer (49408 tokens, SOT 49406, EOT 49407), built offline."""
    from transformers import CLIPTokenizer

    merges_gz = _clip_merges_path()
    if merges_gz is None:
        pytest.fail("clip-anytorch is not installed: run the README's test command "
                    "(it installs tests/requirements-nodeps.txt)")
    lines = gzip.open(merges_gz).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


@pytest.fixture(scope="session")
def tokenize(clip_tokenizer):
    """Tokenizer callable in the form the core takes: text -> token ids, no SOT/EOT, no truncation."""
    def _tokenize(text: str) -> list[int]:
        return clip_tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]
    return _tokenize


def tiny_clip_text_model(hidden_size: int, seed: int):
    """A randomly initialised CLIPTextModel with the real vocabulary size and a tiny width."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModel(config).eval()


@pytest.fixture(scope="session")
def consistory_plus():
    """The ConsiStory+ prompt sets as (identity prompt, frame prompts) pairs."""
    if not CONSISTORY_PLUS.exists():
        pytest.skip(f"benchmark prompts not found at {CONSISTORY_PLUS} (they live in the project's shared/ "
                    "folder beside the checkout)")
    import yaml

    data = yaml.safe_load(CONSISTORY_PLUS.read_text())
    return [(f"{s['style']} {s['subject']}", list(s["settings"])) for sets in data.values() for s in sets]


@pytest.fixture(scope="session")
def tiny_clip_path(clip_tokenizer, tmp_path_factory):
    """A randomly initialised CLIPModel (tiny text and vision towers, 32x32 images) and its processor, saved with
    ``save_pretrained`` the way a user's local copy of ViT-B/32 would be (nothing downloaded)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                                         eos_token_id=49407, pad_token_id=49407),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=16)
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).eval().save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=clip_tokenizer).save_pretrained(folder)
    return folder
