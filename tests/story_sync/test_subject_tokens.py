"""Tests for StorySync subject-token positions (lib_consistency/story_sync/subject_tokens.py), mostly with the real
CLIP BPE."""
from __future__ import annotations

import re

import pytest
import yaml

from lib_consistency.one_prompt_one_story.token_plan import plan_tokens
from lib_consistency.story.format import StoryError, parse_story
from lib_consistency.story.run import consolidation_identity
from lib_consistency.story_sync.subject_tokens import (FUNCTION_WORDS, consolidated_identity_pieces,
                                                       frame_prompt_pieces, story_subjects, subject_positions)
from tests.conftest import CONSISTORY_PLUS

SOT = 49406

COMIC = """\
Bob: a tall man with red hair, blue coat | man, hair
Alice: a young woman with red hair and a blue scarf
Carol: an old woman with a cane | cane
---
[Bob] reads a letter # one
[Alice] [Bob] a man and a woman share red umbrellas
[NC] an empty street
[Carol] [Alice] talk
"""


def prompt_of(pieces) -> str:
    return "".join(text for text, _ in pieces)


def decoded(clip_tokenizer, tokenize, pieces, positions) -> list[str]:
    """The tokens at ``positions`` of the whole prompt's 77-token context, as text."""
    ids = [SOT] + tokenize(prompt_of(pieces))
    return [clip_tokenizer.decode([ids[p]]).strip() for p in positions]


def span_of(tokenize, pieces, owner) -> range:
    """Context positions of ``owner``'s description, from the tokens of the prompt text before it."""
    k = next(k for k, (_, o) in enumerate(pieces) if o == owner)
    start = 1 + len(tokenize(prompt_of(pieces[:k])))
    return range(start, start + len(tokenize(pieces[k][0])))


def content_words(text: str) -> list[str]:
    """Independent reference for the default rule: lower-case letter runs and single digits, minus function words
    (CLIP splits digits one by one); texts with clitics such as "'s" are not used with it."""
    return [w for w in re.findall(r"[a-z]+|\d", text.lower()) if w not in FUNCTION_WORDS]


# --- pieces of the story's prompts ---------------------------------------------------------------------------------

STORIES = [COMIC, "a small red fox with a white tail | fox\nruns\n[NC] snow", "Bob: a man\n---\n[NC] rain\n[Bob] x"]


@pytest.mark.parametrize("text", STORIES)
@pytest.mark.parametrize("style", ["", "comic book", "  watercolor,   soft light  "])
def test_frame_prompt_pieces_join_exactly_like_frame_prompt(text, style):
    story = parse_story(text)
    for i, frame in enumerate(story.frames):
        pieces = frame_prompt_pieces(story, i, style)
        assert prompt_of(pieces) == story.frame_prompt(i, style)
        assert [o for _, o in pieces if o is not None] == list(frame.characters)
        assert all(text == story.character(o).description for text, o in pieces if o is not None)


@pytest.mark.parametrize("text", STORIES)
@pytest.mark.parametrize("style", ["", "comic book", " watercolor \t soft  light "])
def test_consolidated_identity_pieces_join_exactly_like_consolidation_identity(text, style):
    story = parse_story(text)
    pieces = consolidated_identity_pieces(story, style)
    assert prompt_of(pieces) == consolidation_identity(style, story)
    assert [o for _, o in pieces if o is not None] == [c.name for c in story.characters]


# --- chosen subject words ------------------------------------------------------------------------------------------

def test_chosen_words_lie_in_the_owner_description_only(clip_tokenizer, tokenize):
    story = parse_story(COMIC)
    pieces = frame_prompt_pieces(story, 1, "comic book, a man")  # 'man' and 'hair' also occur outside Bob's text
    positions = subject_positions(pieces, tokenize, story_subjects(story))
    assert list(positions) == ["Alice", "Bob"]  # order of appearance in the prompt
    assert decoded(clip_tokenizer, tokenize, pieces, positions["Bob"]) == ["man", "hair"]
    assert set(positions["Bob"]) <= set(span_of(tokenize, pieces, "Bob"))
    # naive reference: tokens of Bob's description whose text is a chosen word, shifted by the span start
    span = span_of(tokenize, pieces, "Bob")
    own = tokenize(story.character("Bob").description)
    assert positions["Bob"] == tuple(span.start + i for i, t in enumerate(own)
                                     if clip_tokenizer.decode([t]).strip() in ("man", "hair"))


def test_a_phrase_and_a_word_inside_it(clip_tokenizer, tokenize):
    story = parse_story("a fox with red hair and a red tail | red hair, hair\nruns")
    pieces = frame_prompt_pieces(story, 0)
    positions = subject_positions(pieces, tokenize, story_subjects(story))["main"]
    assert decoded(clip_tokenizer, tokenize, pieces, positions) == ["red", "hair"]  # not the second 'red'
    assert positions[1] == positions[0] + 1


def test_a_word_appearing_twice(clip_tokenizer, tokenize):
    story = parse_story("Bob: a red fox beside a red barn | RED\n---\n[Bob] sleeps")
    pieces = frame_prompt_pieces(story, 0, "red style")
    positions = subject_positions(pieces, tokenize, story_subjects(story))["Bob"]
    assert decoded(clip_tokenizer, tokenize, pieces, positions) == ["red", "red"]
    assert positions == (5, 9)  # SOT 0, "red style ," 1-3, then "a red fox beside a red" 4-9


def test_shorthand(clip_tokenizer, tokenize):
    story = parse_story("a small red fox with a white tail | fox, white tail\nruns through snow\n[NC] a lake")
    for pieces in (frame_prompt_pieces(story, 0, "film"), consolidated_identity_pieces(story, "film")):
        positions = subject_positions(pieces, tokenize, story_subjects(story))
        assert decoded(clip_tokenizer, tokenize, pieces, positions["main"]) == ["fox", "white", "tail"]
    assert subject_positions(frame_prompt_pieces(story, 1, "film"), tokenize, story_subjects(story)) == {}


def test_benchmark_concept_tokens(clip_tokenizer, tokenize):
    """Every ConsiStory+ set: its concept token chosen as the subject decodes back to itself."""
    if not CONSISTORY_PLUS.exists():
        pytest.skip(f"benchmark prompts not found at {CONSISTORY_PLUS}")
    sets = [s for group in yaml.safe_load(CONSISTORY_PLUS.read_text()).values() for s in group]
    checked = 0
    for s in sets:
        text = f"{s['subject']} | {s['concept_token']}\n" + "\n".join(s["settings"])
        if not re.search(rf"\b{re.escape(s['concept_token'])}\b", s["subject"], re.IGNORECASE):
            with pytest.raises(StoryError, match="is not in the identity prompt"):
                parse_story(text)
            continue
        story = parse_story(text)
        pieces = frame_prompt_pieces(story, 0, s["style"])
        positions = subject_positions(pieces, tokenize, story_subjects(story))["main"]
        ids = [SOT] + tokenize(prompt_of(pieces))
        assert clip_tokenizer.decode([ids[p] for p in positions]).strip() == s["concept_token"].lower()
        checked += 1
    assert checked >= len(sets) - 5


# --- the default rule ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("description", [
    "a tall man with red hair, blue coat",
    "an old woman in her garden, with his 2 dogs and the cat",
    "a white-tipped tail; a fox (small) on the hill! at night",
    "a watercolor illustration of a bioluminescent jellyfish",
])
def test_default_rule_drops_function_words_and_punctuation(clip_tokenizer, tokenize, description):
    story = parse_story(f"Bob: {description}\n---\n[Bob] walks")
    pieces = frame_prompt_pieces(story, 0)
    positions = subject_positions(pieces, tokenize, {})["Bob"]
    ids = [SOT] + tokenize(prompt_of(pieces))
    assert clip_tokenizer.decode([ids[p] for p in positions]).split() == content_words(description)
    assert set(positions) <= set(span_of(tokenize, pieces, "Bob"))


def test_default_rule_on_benchmark_prompts(clip_tokenizer, tokenize, consistory_plus):
    for identity, frames in consistory_plus:
        story = parse_story("\n".join([identity, *frames]))
        pieces = consolidated_identity_pieces(story, "")
        positions = subject_positions(pieces, tokenize, {})["main"]
        ids = [SOT] + tokenize(prompt_of(pieces))
        assert clip_tokenizer.decode([ids[p] for p in positions]).split() == content_words(identity), identity


def test_clitics_are_function_tokens(clip_tokenizer, tokenize):
    pieces = [("a woman's hat, the dog's ball", "Ann")]
    positions = subject_positions(pieces, tokenize, {})["Ann"]
    assert decoded(clip_tokenizer, tokenize, pieces, positions) == ["woman", "hat", "dog", "ball"]


def test_only_function_words_is_an_error(tokenize):
    with pytest.raises(ValueError, match="Bob's description 'with her' has no subject tokens"):
        subject_positions([("style, ", None), ("with her", "Bob")], tokenize, {})


# --- several characters, and what must not matter ------------------------------------------------------------------

def test_multi_character_frame_prompts(clip_tokenizer, tokenize):
    story = parse_story(COMIC)
    subjects = story_subjects(story)
    for i, frame in enumerate(story.frames):
        pieces = frame_prompt_pieces(story, i, "comic book")
        positions = subject_positions(pieces, tokenize, subjects)
        assert list(positions) == list(frame.characters)
        spans = {name: set(span_of(tokenize, pieces, name)) for name in positions}
        for name, found in positions.items():
            assert set(found) <= spans[name]
            words = subjects[name] or content_words(story.character(name).description)
            assert set(decoded(clip_tokenizer, tokenize, pieces, found)) == {w for p in words for w in p.split()}


def test_style_only_shifts_and_frame_text_and_other_subjects_do_not_matter(tokenize):
    story = parse_story(COMIC)
    base = subject_positions(frame_prompt_pieces(story, 1, "comic"), tokenize, story_subjects(story))
    longer = subject_positions(frame_prompt_pieces(story, 1, "a detailed comic, ink"), tokenize,
                               story_subjects(story))
    shift = len(tokenize("a detailed comic, ink")) - len(tokenize("comic"))
    assert shift > 0 and longer == {n: tuple(p + shift for p in ps) for n, ps in base.items()}
    other = parse_story(COMIC.replace("[Alice] [Bob] a man and a woman share red umbrellas", "[Alice] [Bob] x"))
    assert subject_positions(frame_prompt_pieces(other, 1, "comic"), tokenize, story_subjects(other)) == base
    changed = {**story_subjects(story), "Alice": ("woman",), "Nobody": ("x",)}
    assert subject_positions(frame_prompt_pieces(story, 1, "comic"), tokenize, changed)["Bob"] == base["Bob"]


def test_consolidated_positions_sit_in_the_token_plan_identity_span(tokenize):
    story = parse_story(COMIC)
    identity = consolidated_identity_pieces(story, "comic book")
    plan = plan_tokens(prompt_of(identity), [f.prompt for f in story.frames], tokenize)
    positions = subject_positions(identity, tokenize, story_subjects(story))
    assert set(positions) == {"Bob", "Alice", "Carol"}
    assert all(set(p) <= set(plan.frames[0].identity.positions) for p in positions.values())
    whole = identity + [piece for f in story.frames for piece in ((" ", None), (f.prompt, None))]
    assert prompt_of(whole) == plan.frames[0].text
    assert subject_positions(whole, tokenize, story_subjects(story)) == positions


# --- host token items ----------------------------------------------------------------------------------------------

_EMPHASIS = re.compile(r"\(([^()]*?)(?::([\d.]+))?\)")


def emphasis_tokenizer(tokenize):
    """A1111-like items (id, weight, embedding): a closed ``(text:w)`` is tokenised alone with weight w and its
    brackets consumed; an unclosed bracket or weight stays literal text."""
    def items(text):
        out, pos = [], 0
        for m in _EMPHASIS.finditer(text):
            out += [(i, 1.0, None) for i in tokenize(text[pos:m.start()])]
            out += [(i, float(m.group(2) or 1.1), None) for i in tokenize(m.group(1))]
            pos = m.end()
        return out + [(i, 1.0, None) for i in tokenize(text[pos:])]
    return items


def test_host_items_with_emphasis(clip_tokenizer, tokenize):
    story = parse_story("Bob: a tall man with red hair, (blue coat:1.2)\n---\n[Bob] walks (fast)")
    pieces = frame_prompt_pieces(story, 0, "comic")
    host = emphasis_tokenizer(tokenize)
    ids = [SOT] + [i for i, _, _ in host(prompt_of(pieces))]
    default = subject_positions(pieces, host, {})["Bob"]
    assert clip_tokenizer.decode([ids[p] for p in default]).split() == ["tall", "man", "red", "hair", "blue", "coat"]
    chosen = subject_positions(pieces, host, {"Bob": ("coat", "tall man")})["Bob"]
    assert clip_tokenizer.decode([ids[p] for p in chosen]).split() == ["tall", "man", "coat"]
    # plain CLIP reads '),' after the description as one token: the positions of its words are not affected
    plain = subject_positions(pieces, tokenize, {})["Bob"]
    ids = [SOT] + tokenize(prompt_of(pieces))
    assert clip_tokenizer.decode([ids[p] for p in plain[:6]]).split() == ["tall", "man", "red", "hair", "blue",
                                                                          "coat"]


def test_weights_are_ignored_and_embedding_names_are_not(tokenize):
    ids = {"a": 1, "man": 2, "emb": 0, "!": 0, ",": 3}

    def host(text):  # the embedding 'emb' has id 0 like '!', told apart by its name; weights differ by place
        words = text.replace(",", " , ").split()
        return [(ids[w], 1.0 + k, "emb" if w == "emb" else None) for k, w in enumerate(words)]

    pieces = [("a", None), (", ", None), ("a ! emb man", "Bob")]
    assert subject_positions(pieces, host, {"Bob": ("emb",)}) == {"Bob": (5,)}
    assert subject_positions(pieces, host, {"Bob": ("!",)}) == {"Bob": (4,)}
    plain = subject_positions(pieces, lambda text: [i for i, _, _ in host(text)], {"Bob": ("man",)})
    assert plain == subject_positions(pieces, host, {"Bob": ("man",)}) == {"Bob": (6,)}


# --- errors --------------------------------------------------------------------------------------------------------

def whitespace_tokenizer():
    """One token per whitespace-separated word: 'hair,' joined is not 'hair' + ','."""
    vocabulary: dict[str, int] = {}
    return lambda text: [vocabulary.setdefault(w, len(vocabulary)) for w in text.split()]


@pytest.mark.parametrize("pieces, name", [
    ([("red hair", "Bob"), (", ", None), ("walks", None)], "Bob"),
    ([("a man", "Bob"), (" ", None), ("a woman", "Alice"), (", ", None), ("walks", None)], "Alice"),
])
def test_description_tokenising_differently_inside_the_prompt_names_the_character(pieces, name):
    with pytest.raises(ValueError, match=f"^{name}'s description '[^']*' does not tokenise the same"):
        subject_positions(pieces, whitespace_tokenizer(), {})


def test_real_clip_seam_after_a_trailing_period(clip_tokenizer, tokenize):
    """'hat.' then ', ' is one token ('.,') inside the prompt: the subject words keep their positions."""
    story = parse_story("ink.\nBob: a man with a hat.\nAlice: a woman\n---\n[Bob] [Alice] talk".split("\n", 1)[1])
    pieces = frame_prompt_pieces(story, 0, "ink.")
    found = subject_positions(pieces, tokenize, {})
    ids = [SOT] + tokenize(prompt_of(pieces))
    assert clip_tokenizer.decode([ids[p] for p in found["Bob"]]).split() == ["man", "hat"]
    assert clip_tokenizer.decode([ids[p] for p in found["Alice"]]).split() == ["woman"]


def test_only_the_subject_positions_are_verified(tokenize):
    def chunked(at):  # a host that inserts a padding token at joined index ``at`` (as a chunk break would)
        def host(text):
            ids = tokenize(text)
            return ids[:at] + [49407] + ids[at:] if "snow" in text else ids  # the whole prompt only
        return host

    pieces = [("a red fox", "Bob"), (" ", None), ("runs through deep snow", None)]  # Bob: joined indices 0-2
    expected = subject_positions(pieces, tokenize, {})
    assert subject_positions(pieces, chunked(3), {}) == expected  # after Bob's words
    with pytest.raises(ValueError, match="Bob's description 'a red fox' does not tokenise the same .*token 3"):
        subject_positions(pieces, chunked(2), {})  # between 'red' and 'fox'


def test_chosen_word_not_among_the_description_tokens(tokenize):
    with pytest.raises(ValueError, match="subject word 'fox' of Bob is not among the tokens of its description "
                                         "'a red foxes den'"):
        subject_positions([("a red foxes den", "Bob")], tokenize, {"Bob": ("fox",)})


@pytest.mark.parametrize("filler, ok", [(72, True), (73, False)])
def test_positions_beyond_the_first_chunk(tokenize, filler, ok):
    pieces = [(" ".join(["red"] * filler), None), (", ", None), ("a man", "Bob"), (", ", None), ("walks", None)]
    if ok:
        assert subject_positions(pieces, tokenize, {"Bob": ("man",)}) == {"Bob": (75,)}
    else:
        with pytest.raises(ValueError, match="^Bob: its description lies beyond the first 75 tokens .* 76"):
            subject_positions(pieces, tokenize, {"Bob": ("man",)})


def test_extra_network_tags_are_not_tokens_of_the_pieces(tokenize):
    """The host removes ``<lora:…>`` tags before tokenising (``extra_networks.parse_prompts``); the subject positions
    are those of the prompt without them, wherever the tags were (a description, a frame line)."""
    tagged = parse_story(COMIC.replace("blue coat |", "blue coat <lora:bob:0.7> |")
                         .replace("an empty street", "<lora:rain:1> street")
                         .replace("a young woman", "a <hypernet:x:1> young woman"))
    plain = parse_story(COMIC.replace("an empty street", " street"))
    for i in range(len(tagged.frames)):
        pieces = frame_prompt_pieces(tagged, i, "comic book")
        assert "<" not in prompt_of(pieces)
        host_prompt = re.sub(r"<(\w+):([^>]+)>", "", tagged.frame_prompt(i, "comic book"))
        assert tokenize(prompt_of(pieces)) == tokenize(host_prompt)
        assert subject_positions(pieces, tokenize, story_subjects(tagged)) == \
            subject_positions(frame_prompt_pieces(plain, i, "comic book"), tokenize, story_subjects(plain))
    assert subject_positions(consolidated_identity_pieces(tagged), tokenize, story_subjects(tagged)) == \
        subject_positions(consolidated_identity_pieces(plain), tokenize, story_subjects(plain))
