"""Tests for the story format (lib_consistency/story/format.py): parsing, errors, round trips."""
from __future__ import annotations

import json
import random

import pytest

from lib_consistency.story.format import (MAX_CHARACTERS, MAX_FRAMES, MAX_PROMPT_CHARS, Character, Frame, Story,
                                          StoryError, parse_story)

NAMED = """\
// a two-character comic
Bob: a man with a beard, blue coat
Alice: a woman with red hair

---
[Bob] reading a newspaper # Monday morning
// the lunch scene
[bob] and [ALICE] having lunch
[NC] a rainy street #
"""

SHORTHAND = """\
a photo of a red fox

sitting in the snow
// no fox here
[NC] an empty forest at dawn # the end
"""


# --- detection and parsed content ----------------------------------------------------------------------------------

def test_named_form():
    story = parse_story(NAMED)
    assert not story.shorthand
    assert story.characters == (Character("Bob", "a man with a beard, blue coat"),
                                Character("Alice", "a woman with red hair"))
    assert story.frames == (Frame("reading a newspaper", ("Bob",), "Monday morning"),
                            Frame("and having lunch", ("Bob", "Alice")),
                            Frame("a rainy street", ()))
    assert [f.line for f in story.frames] == [6, 8, 9]  # comments and blank lines still count


def test_shorthand_form():
    story = parse_story(SHORTHAND)
    assert story.shorthand
    assert story.characters == (Character("main", "a photo of a red fox"),)
    assert story.frames == (Frame("sitting in the snow", ("main",)), Frame("an empty forest at dawn", (), "the end"))
    assert [f.line for f in story.frames] == [3, 5]


@pytest.mark.parametrize("text, shorthand", [
    ("a fox\nin snow", True),
    ("Bob: a man\n---\n[Bob] walks", False),
    ("Bob: a man\n  ---  \n[Bob] walks", False),  # '---' is compared after stripping
    ("a fox: red\n----\nin snow", True),  # '----' is not the separator, ':' means nothing in the shorthand
    ("// {not json}\na fox\nin snow", True),
])
def test_form_detection(text, shorthand):
    assert parse_story(text).shorthand is shorthand


def test_tags_are_case_insensitive_and_store_canonical_names():
    story = parse_story("Old Tom: an old man\nbob: a boy\n---\n[old TOM] and [BOB] fishing [Bob] together")
    assert story.frames[0].characters == ("Old Tom", "bob")
    assert story.frames[0].prompt == "and fishing together"
    assert story.character("OLD tom").description == "an old man"


def test_tags_in_any_order_and_position_and_a1111_brackets_stay_text():
    story = parse_story("A: x\nB: y\n---\nboth [B] meet [ A ] in the [park:forest:0.5] at [a|b]")
    assert story.frames[0].characters == ("B", "A")
    assert story.frames[0].prompt == "both meet in the [park:forest:0.5] at [a|b]"


@pytest.mark.parametrize("line, prompt, caption", [
    ("a fox # Hello there", "a fox", "Hello there"),
    ("a fox #", "a fox", ""),
    ("a fox # says # hi", "a fox", "says # hi"),  # the first ' # ' starts the caption
    ("a #fox#tag", "a #fox#tag", ""),  # '#' without spaces is prompt text
    ("a fox   #   spaced   out  ", "a fox", "spaced out"),
    ("[NC] snow # [NC] stays caption text", "snow", "[NC] stays caption text"),
])
def test_captions(line, prompt, caption):
    frame = parse_story(f"identity\n{line}").frames[0]
    assert (frame.prompt, frame.caption) == (prompt, caption)


def test_frame_line_is_not_part_of_equality():
    assert Frame("a", ("main",), line=3) == Frame("a", ("main",), line=None)


# --- derived values ------------------------------------------------------------------------------------------------

def test_identity_prompt_both_forms():
    assert parse_story(SHORTHAND).identity_prompt == "a photo of a red fox"
    assert parse_story(NAMED).identity_prompt == "a man with a beard, blue coat and a woman with red hair"


def test_frame_groups():
    assert parse_story(NAMED).frame_groups() == [frozenset({"Bob"}), frozenset({"Bob", "Alice"}), frozenset()]
    assert parse_story(SHORTHAND).frame_groups() == [frozenset({"main"}), frozenset()]


@pytest.mark.parametrize("i, style, expected", [
    (0, "", "a man with a beard, blue coat, reading a newspaper"),
    (1, "comic book", "comic book, a man with a beard, blue coat, a woman with red hair, and having lunch"),
    (2, "  comic  book ", "comic book, a rainy street"),
    (-1, "", "a rainy street"),
])
def test_frame_prompt(i, style, expected):
    assert parse_story(NAMED).frame_prompt(i, style) == expected


def test_frame_prompt_shorthand():
    story = parse_story(SHORTHAND)
    assert story.frame_prompt(0) == "a photo of a red fox, sitting in the snow"
    assert story.frame_prompt(1, "film") == "film, an empty forest at dawn"


def test_character_lookup_error():
    with pytest.raises(KeyError, match="Carol.*defined: Bob, Alice"):
        parse_story(NAMED).character("Carol")


# --- round trips ---------------------------------------------------------------------------------------------------

MESSY = [
    NAMED,
    SHORTHAND,
    "  a   fox  \n\n   in   the  snow   #  caption  \n",
    "X: a thing\n---\n[X]stands [x] here # c",
    "A: a\nB: b\nC: c\n---\n[C] [A] one\n[B] two [b] # cap\n[NC] three # #",
]


@pytest.mark.parametrize("text", MESSY)
def test_text_round_trip_and_fixed_point(text):
    story = parse_story(text)
    normal = story.to_text()
    assert parse_story(normal) == story
    assert parse_story(normal).to_text() == normal


@pytest.mark.parametrize("text", MESSY)
def test_dict_and_json_round_trips(text):
    story = parse_story(text)
    assert parse_story(story.to_dict()) == story
    assert parse_story(story.to_json()) == story
    assert parse_story(json.loads(story.to_json())) == story


def test_to_text_forms():
    assert parse_story(NAMED).to_text() == ("Bob: a man with a beard, blue coat\nAlice: a woman with red hair\n---\n"
                                            "[Bob] reading a newspaper # Monday morning\n"
                                            "[Bob] [Alice] and having lunch\n[NC] a rainy street\n")
    assert parse_story(SHORTHAND).to_text() == ("a photo of a red fox\nsitting in the snow\n"
                                                "[NC] an empty forest at dawn # the end\n")


def test_to_dict_forms():
    assert parse_story(SHORTHAND).to_dict() == {
        "identity": "a photo of a red fox",
        "frames": [{"prompt": "sitting in the snow", "characters": ["main"]},
                   {"prompt": "an empty forest at dawn", "characters": [], "caption": "the end"}]}
    assert parse_story(NAMED).to_dict()["characters"] == {"Bob": "a man with a beard, blue coat",
                                                           "Alice": "a woman with red hair"}


def test_list_of_lines_and_tuple():
    assert parse_story(NAMED.splitlines()) == parse_story(NAMED)
    assert [f.line for f in parse_story(NAMED.splitlines()).frames] == [6, 8, 9]
    assert parse_story(tuple(SHORTHAND.splitlines())) == parse_story(SHORTHAND)


def test_json_inputs():
    shorthand = {"identity": "a fox", "frames": ["in snow # hi", {"prompt": "a wood", "characters": []},
                                                 {"prompt": "a den", "characters": ["MAIN"], "caption": " home "}]}
    assert parse_story(shorthand) == parse_story("a fox\nin snow # hi\n[NC] a wood\na den # home")
    named = {"characters": {"Bob": "a man"}, "frames": ["[bob] walks", {"prompt": "rain", "characters": []}]}
    assert parse_story(named) == parse_story("Bob: a man\n---\n[Bob] walks\n[NC] rain")
    assert parse_story("  \n " + json.dumps(named)) == parse_story(named)


WORDS = "red fox snow forest river castle night lantern quiet old small brave blue".split()


def _random_story(rng: random.Random) -> Story:
    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, n)))

    shorthand = rng.random() < 0.4
    names = ["main"] if shorthand else rng.sample(["Bob", "Alice", "Old Tom", "x_1", "Mira-Lee", "Z"],
                                                  rng.randint(1, 6))
    characters = tuple(Character(n, text(8)) for n in names)
    frames = []
    for _ in range(rng.randint(1, 12)):
        cast = rng.sample(names, rng.randint(0, len(names))) if rng.random() < 0.8 else []
        frames.append(Frame(text(10), tuple(cast), text(4) if rng.random() < 0.5 else ""))
    return Story(characters, tuple(frames), shorthand)


@pytest.mark.parametrize("seed", range(40))
def test_random_stories_round_trip(seed):
    story = _random_story(random.Random(seed))
    text = story.to_text()
    assert parse_story(text) == story
    assert parse_story(text).to_text() == text
    assert parse_story(story.to_json()) == story
    assert parse_story(text.splitlines()) == story
    lines = text.splitlines()
    noisy = [f"  // noise {i}\n\n  {line}  " for i, line in enumerate(lines)]  # comments, blanks, indentation
    assert parse_story("\n".join(noisy)) == story
    assert [f.line for f in parse_story("\n".join(noisy)).frames][-1] == 3 * len(lines)


# --- limits --------------------------------------------------------------------------------------------------------

def test_limits_at_the_boundary_are_allowed():
    names = [f"C{i}" for i in range(MAX_CHARACTERS)]
    text = "\n".join(f"{n}: person {n}" for n in names) + "\n---\n" + "\n".join(["[NC] x"] * MAX_FRAMES)
    story = parse_story(text)
    assert len(story.characters) == MAX_CHARACTERS and len(story.frames) == MAX_FRAMES
    assert parse_story("id\n" + "y" * MAX_PROMPT_CHARS).frames[0].prompt == "y" * MAX_PROMPT_CHARS
    assert parse_story(f"{'N' * 32}: x\n---\n[{'n' * 32}] y").frames[0].characters == ("N" * 32,)


# --- errors: text form ---------------------------------------------------------------------------------------------

TEXT_ERRORS = [
    ("", None, "no identity line"),
    ("\n  // only a comment\n", None, "no identity line"),
    ("a fox\n\n// none", 1, "no frames"),
    ("Bob: a man\n---\n// none", 2, "no frames"),
    ("a fox\n[Bob] walks", 2, "unknown character tag [Bob]: the single-character form"),
    ("a fox\n[NC] [main] walks", 2, "cannot be combined"),
    ("a fox\n[cat] sleeps", 2, "'Name: description' lines and '---'"),
    ("Bob: a man\nAlice: a woman\n---\n[Bob] x\n[Bobb] y", 5, "unknown character tag [Bobb] (defined: Bob, Alice)"),
    ("Bob: a man\n---\n\nwalks alone", 4, "frame has no character tag: add [Name] (defined: Bob) or [NC]"),
    ("Bob: a man\n---\n[Bob] [NC] walks", 3, "[NC] (no character) cannot be combined"),
    ("Bob: a man\n---\n[Bob]", 3, "frame has no prompt text"),
    ("Bob: a man\n---\n[Bob] # caption only", 3, "frame has no prompt text"),
    ("a fox\n[NC]", 2, "frame has no prompt text"),
    ("a fox\n# caption", 2, "frame has no prompt text"),
    ("---\n[Bob] x", 1, "'---' with no 'Name: description' lines"),
    ("// c\n\n---\nx", 3, "'---' with no 'Name: description' lines"),
    ("Bob: a\n---\n[Bob] x\n---\n[Bob] y", 4, "a second '---' line"),
    ("Bob a man\n---\n[Bob] x", 1, "expected 'Name: description' before '---'"),
    ("[Bob] a man\n---\n[Bob] x", 1, "expected 'Name: description'"),
    ("// c\nBob:   \n---\n[Bob] x", 2, "description of Bob is empty"),
    ("1Bob: a man\n---\n[NC] x", 1, "invalid character name '1Bob'"),
    ("Bob!: a man\n---\n[NC] x", 1, "invalid character name"),
    (f"{'B' * 33}: a man\n---\n[NC] x", 1, "at most 32 characters"),
    ("nc: nobody\n---\n[NC] x", 1, "the name 'nc' is reserved"),
    ("Bob: a\nBOB: b\n---\n[Bob] x", 2, "character 'BOB' is defined twice"),
    ("Bob: a man [Alice]\n---\n[Bob] x", 1, "description of Bob contains [Alice]"),
    ("Bob: a man # hero\n---\n[Bob] x", 1, "description of Bob contains ' # '"),
    ("a fox # hero\nx", 1, "identity prompt contains ' # '"),
    ("[NC] a fox\nx", 1, "identity prompt contains [NC]"),
    ("Bob: a\n---\n[Bob] // x", 3, "starts with '//'"),
    ("Bob: a\n---\n[Bob] ---", 3, "is '---'"),
    ("Bob: a\n---\n[Bob] a [Al[Bob]ice] b", 3, "would be read as a character tag"),
    ("Bob: a\n---\n[Bob] a [Bob]# b", 3, "would be read as the start of a caption"),
    ("\n".join(f"C{i}: p" for i in range(MAX_CHARACTERS + 1)) + "\n---\n[NC] x", MAX_CHARACTERS + 1,
     f"more than {MAX_CHARACTERS} characters"),
    ("id\n" + "\n".join(["x"] * (MAX_FRAMES + 1)), MAX_FRAMES + 2, f"more than {MAX_FRAMES} frames"),
    ("id\nshort\n" + "y" * (MAX_PROMPT_CHARS + 1), 3, f"the limit is {MAX_PROMPT_CHARS}"),
    ("{\n  \"identity\": \"x\",\n  frames: []\n}", 3, "invalid JSON"),
    ("  {\"identity\": \"x\"} trailing", 1, "invalid JSON: Extra data"),
]


@pytest.mark.parametrize("text, line, fragment", TEXT_ERRORS)
def test_text_errors(text, line, fragment):
    with pytest.raises(StoryError) as info:
        parse_story(text)
    error = info.value
    assert error.line == line and error.field is None
    assert fragment in error.problem
    assert str(error) == (f"story line {line}: {error.problem}" if line else f"story: {error.problem}")


# --- errors: JSON form ---------------------------------------------------------------------------------------------

NAMED_JSON = {"characters": {"Bob": "a man", "Alice": "a woman"}}
FRAME = [{"prompt": "x", "characters": ["Bob"]}]

JSON_ERRORS = [
    ({"frames": FRAME}, None, "found neither"),
    ({**NAMED_JSON, "identity": "x", "frames": FRAME}, None, "not both"),
    ({**NAMED_JSON, "frames": FRAME, "title": "t"}, "title", "unknown key 'title'"),
    ({"identity": "x"}, "frames", "missing"),
    ({"identity": "x", "frames": []}, "frames", "no frames"),
    ({"identity": "x", "frames": "a\nb"}, "frames", "expected a list, got a string"),
    ({"identity": 3, "frames": ["a"]}, "identity", "expected a string, got a number"),
    ({"identity": "  ", "frames": ["a"]}, "identity", "identity prompt is empty"),
    ({"characters": [], "frames": FRAME}, "characters", "expected an object, got a list"),
    ({"characters": {}, "frames": FRAME}, "characters", "no characters defined"),
    ({"characters": {"Bob": None}, "frames": FRAME}, "characters.Bob", "expected a string, got null"),
    ({"characters": {"Bob": "a", "bob": "b"}, "frames": FRAME}, "characters.bob", "defined twice"),
    ({"characters": {"NC": "a"}, "frames": FRAME}, "characters.NC", "reserved"),
    ({"characters": {"9": "a"}, "frames": FRAME}, "characters.9", "invalid character name"),
    ({"characters": {f"C{i}": "p" for i in range(MAX_CHARACTERS + 1)}, "frames": FRAME},
     f"characters.C{MAX_CHARACTERS}", "more than"),
    ({"identity": "x", "frames": ["a"] * (MAX_FRAMES + 1)}, "frames", f"more than {MAX_FRAMES} frames"),
    ({**NAMED_JSON, "frames": FRAME + [7]}, "frames[1]", "expected an object, got a number"),
    ({**NAMED_JSON, "frames": FRAME + [{"prompt": "x"}]}, "frames[1].characters", "missing: list the frame's"),
    ({**NAMED_JSON, "frames": [{"characters": []}]}, "frames[0].prompt", "missing"),
    ({**NAMED_JSON, "frames": [{"prompt": ["x"], "characters": []}]}, "frames[0].prompt", "expected a string"),
    ({**NAMED_JSON, "frames": [{"prompt": "x", "characters": "Bob"}]}, "frames[0].characters", "expected a list"),
    ({**NAMED_JSON, "frames": FRAME * 3 + [{"prompt": "x", "characters": ["Bob", "Bobb"]}]},
     "frames[3].characters[1]", "unknown character 'Bobb' (defined: Bob, Alice)"),
    ({**NAMED_JSON, "frames": [{"prompt": "x", "characters": ["Bob", 1]}]}, "frames[0].characters[1]",
     "expected a string, got a number"),
    ({**NAMED_JSON, "frames": [{"prompt": "x", "characters": ["NC"]}]}, "frames[0].characters[0]", "unknown"),
    ({**NAMED_JSON, "frames": [{"prompt": "x", "characters": [], "caption": 1}]}, "frames[0].caption",
     "expected a string"),
    ({**NAMED_JSON, "frames": [{"prompt": "x", "characters": [], "note": ""}]}, "frames[0].note", "unknown key"),
    ({**NAMED_JSON, "frames": [{"prompt": "[Bob] x", "characters": []}]}, "frames[0].prompt",
     "read as a character tag"),
    ({**NAMED_JSON, "frames": [{"prompt": "x # y", "characters": []}]}, "frames[0].prompt", "start of a caption"),
    ({**NAMED_JSON, "frames": [{"prompt": "y" * (MAX_PROMPT_CHARS + 1), "characters": []}]}, "frames[0].prompt",
     "the limit is"),
    ({**NAMED_JSON, "frames": FRAME + ["untagged text"]}, "frames[1]", "frame has no character tag"),
    ({**NAMED_JSON, "frames": ["[Bobb] x"]}, "frames[0]", "unknown character tag [Bobb]"),
    ({"identity": "x", "frames": [{"prompt": "y", "characters": ["Bob"]}]}, "frames[0].characters[0]",
     "(defined: main)"),
    ({"identity": "x", "frames": ["[Bob] y"]}, "frames[0]", "single-character form"),
]


@pytest.mark.parametrize("data, field, fragment", JSON_ERRORS)
def test_json_errors(data, field, fragment):
    for value in (data, json.dumps(data)):  # as data and as JSON text
        with pytest.raises(StoryError) as info:
            parse_story(value)
        error = info.value
        assert error.field == field and error.line is None
        assert fragment in error.problem
        assert str(error) == (f"story field {field}: {error.problem}" if field else f"story: {error.problem}")


@pytest.mark.parametrize("value, field, fragment", [
    (42, None, "got int"),
    (b"a fox\nx", None, "got bytes"),
    (None, None, "got NoneType"),
    (["a fox", 3], "[1]", "expected a line of text, got int"),
    (["a fox", "x\ny"], "[1]", "line break"),
    ([], None, "no identity line"),
])
def test_bad_input_types(value, field, fragment):
    with pytest.raises(StoryError) as info:
        parse_story(value)
    assert info.value.field == field and fragment in info.value.problem


def test_story_error_is_a_value_error_with_message():
    error = StoryError("unknown character tag [Bobb] (defined: Alice, Bob)", line=4)
    assert isinstance(error, ValueError)
    assert str(error) == "story line 4: unknown character tag [Bobb] (defined: Alice, Bob)"
    assert str(StoryError("bad", field="frames[2].prompt")) == "story field frames[2].prompt: bad"


# --- subject words (StorySync subject tokens) ----------------------------------------------------------------------

SUBJECTS = """\
Bob: a tall man with red hair | man, Red Hair
Alice: a woman in a [red|blue] dress
---
[Bob] waits | patiently [a|b] # one
[Alice] [Bob] talk
"""


def test_subject_words_named_form():
    story = parse_story(SUBJECTS)
    assert story.characters == (Character("Bob", "a tall man with red hair", ("man", "Red Hair")),
                                Character("Alice", "a woman in a [red|blue] dress"))
    assert story.frames[0].prompt == "waits | patiently [a|b]"  # ' | ' in a frame line stays prompt text
    assert story.frame_prompt(0) == "a tall man with red hair, waits | patiently [a|b]"
    assert story.identity_prompt == "a tall man with red hair and a woman in a [red|blue] dress"


def test_subject_words_shorthand_and_spacing():
    story = parse_story("a small red fox with a white tail | fox\nruns | jumps")
    assert story.characters == (Character("main", "a small red fox with a white tail", ("fox",)),)
    assert story.frames[0].prompt == "runs | jumps"
    spaced = parse_story("a small  fox with no tail \t|\t small  fox ,  tail \nx").characters[0]
    assert (spaced.description, spaced.subject) == ("a small fox with no tail", ("small fox", "tail"))
    for text in ("a [fox|cat]\nx", "a fox|fox\nx", "a fox |fox\nx", "a fox| fox\nx"):  # no ' | ': prompt text
        character = parse_story(text).characters[0]
        assert character.subject == () and character.description == text.split("\n")[0]


@pytest.mark.parametrize("description, word, found", [
    ("a tall man with red hair", "MAN", True),
    ("a tall man with red hair", "red hair", True),
    ("a tall man with red hair", "ma", False),
    ("a tall man with red hair", "hair red", False),
    ("a white-tipped tail", "white", True),
    ("a white-tipped tail", "white-tipped tail", True),
    ("a fox_cub", "fox", True),
    ("foxes", "fox", False),
    ("24 cats", "2", False),
])
def test_subject_words_must_occur_as_whole_words(description, word, found):
    text = f"Bob: {description} | {word}\n---\n[Bob] x"
    if found:
        assert parse_story(text).characters[0].subject == (word,)
    else:
        with pytest.raises(StoryError, match=f"subject word '{word}' is not in Bob's description"):
            parse_story(text)


def test_subject_words_limit_at_the_boundary():
    from lib_consistency.story.format import MAX_SUBJECT_WORDS
    description = " ".join(f"w{i}" for i in range(MAX_SUBJECT_WORDS + 1))
    words = [f"W{i}" for i in range(MAX_SUBJECT_WORDS)]
    assert parse_story(f"{description} | {', '.join(words)}\nx").characters[0].subject == tuple(words)


def test_character_equality_includes_subject():
    assert Character("Bob", "a man", ("man",)) != Character("Bob", "a man")
    assert Character("Bob", "a man") == Character("Bob", "a man", ())


def test_subject_words_round_trips_and_forms():
    story = parse_story(SUBJECTS)
    assert story.to_text().splitlines()[:2] == ["Bob: a tall man with red hair | man, Red Hair",
                                                "Alice: a woman in a [red|blue] dress"]
    assert story.to_dict()["characters"] == {
        "Bob": {"description": "a tall man with red hair", "subject": ["man", "Red Hair"]},
        "Alice": "a woman in a [red|blue] dress"}
    shorthand = parse_story("a fox with a white tail | fox, white tail\nruns")
    assert shorthand.to_text() == "a fox with a white tail | fox, white tail\nruns\n"
    assert shorthand.to_dict() == {"identity": "a fox with a white tail", "subject": ["fox", "white tail"],
                                   "frames": [{"prompt": "runs", "characters": ["main"]}]}
    for s in (story, shorthand):
        assert parse_story(s.to_text()) == s
        assert parse_story(s.to_dict()) == s
        assert parse_story(s.to_json()) == s
        assert parse_story(s.to_text()).to_text() == s.to_text()


def test_subject_words_json_inputs():
    named = {"characters": {"Bob": {"description": " a  tall man ", "subject": ["man", " tall  man "]},
                            "Alice": "a woman | woman", "Carol": {"description": "an old woman", "subject": []}},
             "frames": ["[Bob] x"]}
    assert parse_story(named).characters == (Character("Bob", "a tall man", ("man", "tall man")),
                                             Character("Alice", "a woman", ("woman",)),
                                             Character("Carol", "an old woman"))
    fox = parse_story("a red fox | fox\nx")
    assert parse_story({"identity": "a red fox", "subject": ["fox"], "frames": ["x"]}) == fox
    assert parse_story({"identity": "a red fox | fox", "frames": ["x"]}) == fox
    assert parse_story({"identity": "a red fox", "subject": [], "frames": ["x"]}) == parse_story("a red fox\nx")


def _random_subject_story(rng: random.Random) -> Story:
    story = _random_story(rng)
    characters = []
    for c in story.characters:
        words = list(dict.fromkeys(c.description.split()))
        chosen = rng.sample(words, rng.randint(0, min(3, len(words))))
        if chosen and rng.random() < 0.5:  # a two-word phrase when the description has one
            first = c.description.split()
            if len(first) > 1:
                chosen[0] = " ".join(first[:2])
        chosen = list({w.casefold(): w for w in chosen}.values())
        characters.append(Character(c.name, c.description, tuple(w.upper() if rng.random() < 0.3 else w
                                                                 for w in chosen)))
    return Story(tuple(characters), story.frames, story.shorthand)


@pytest.mark.parametrize("seed", range(40))
def test_random_stories_with_subject_words_round_trip(seed):
    story = _random_subject_story(random.Random(seed))
    assert parse_story(story.to_text()) == story
    assert parse_story(story.to_text()).to_text() == story.to_text()
    assert parse_story(story.to_dict()) == story
    assert parse_story(story.to_json()) == story


SUBJECT_TEXT_ERRORS = [
    ("Bob: a tall man with red hair | tail\n---\n[Bob] x", 1,
     "subject word 'tail' is not in Bob's description 'a tall man with red hair'"),
    ("// c\na small fox | tail\nx", 2, "subject word 'tail' is not in the identity prompt 'a small fox'"),
    ("Bob: a man |\n---\n[Bob] x", 1, "nothing after ' | ' in Bob's description"),
    ("Bob: a man |   \n---\n[Bob] x", 1, "nothing after ' | ' in Bob's description"),
    ("a fox | \nx", 1, "nothing after ' | ' in the identity prompt"),
    ("Bob: a man | man,\n---\n[Bob] x", 1, "subject word 2 of Bob's description is empty"),
    ("Bob: a man | , man\n---\n[Bob] x", 1, "subject word 1 of Bob's description is empty"),
    ("Bob: a man | man, , man\n---\n[Bob] x", 1, "subject word 2 of Bob's description is empty"),
    ("Bob: a man | man, MAN\n---\n[Bob] x", 1, "subject word 'MAN' is listed twice for Bob's description"),
    ("Bob: a man | man | man\n---\n[Bob] x", 1, "subject word 'man | man' is not in Bob's description"),
    ("Bob: | man\n---\n[Bob] x", 1, "description of Bob is empty"),
    ("| fox\nx", 1, "identity prompt is empty"),
    ("Bob: a man | man # hero\n---\n[Bob] x", 1, "subject word 'man # hero' is not in"),
    ("Bob: a man # hero | man\n---\n[Bob] x", 1, "description of Bob contains ' # '"),
    ("Bob: a man | [Alice]\nAlice: a\n---\n[Bob] x", 1, "subject word '[Alice]' is not in"),
    ("A: x\nBob: " + " ".join(f"w{i}" for i in range(17)) + " | " + ", ".join(f"w{i}" for i in range(17))
     + "\n---\n[Bob] x", 2, "17 subject words for Bob's description; the limit is 16"),
]


@pytest.mark.parametrize("text, line, fragment", SUBJECT_TEXT_ERRORS)
def test_subject_word_text_errors(text, line, fragment):
    with pytest.raises(StoryError) as info:
        parse_story(text)
    assert (info.value.line, info.value.field) == (line, None)
    assert fragment in info.value.problem, info.value.problem
    assert str(info.value) == f"story line {line}: {info.value.problem}"


SUBJECT_JSON_ERRORS = [
    ({"characters": {"Bob": {"description": "a man", "subject": ["man", "tail"]}}},
     "characters.Bob.subject[1]", "subject word 'tail' is not in Bob's description 'a man'"),
    ({"characters": {"Bob": {"description": "a man", "subject": "man"}}}, "characters.Bob.subject",
     "expected a list, got a string"),
    ({"characters": {"Bob": {"description": "a man", "subject": [3]}}}, "characters.Bob.subject[0]",
     "expected a string, got a number"),
    ({"characters": {"Bob": {"description": "a man", "subject": ["  "]}}}, "characters.Bob.subject[0]",
     "subject word 1 of Bob's description is empty"),
    ({"characters": {"Bob": {"description": "a man, hat", "subject": ["man, hat"]}}}, "characters.Bob.subject[0]",
     "contains ','"),
    ({"characters": {"Bob": {"description": "a man | man", "subject": ["man"]}}}, "characters.Bob.subject",
     "subject words are given twice"),
    ({"characters": {"Bob": {"description": "a man", "subject": ["w"] * 17}}}, "characters.Bob.subject",
     "17 subject words for Bob's description"),
    ({"characters": {"Bob": {"subject": ["man"]}}}, "characters.Bob.description", "missing"),
    ({"characters": {"Bob": {"description": 1}}}, "characters.Bob.description", "expected a string"),
    ({"characters": {"Bob": {"description": "  "}}}, "characters.Bob.description", "description of Bob is empty"),
    ({"characters": {"Bob": {"description": "a man", "words": []}}}, "characters.Bob.words", "unknown key 'words'"),
    ({"characters": {"Bob": "a man | tail"}}, "characters.Bob", "subject word 'tail' is not in Bob's description"),
    ({"characters": {"Bob": "a man"}, "subject": ["man"]}, "subject", "'subject' goes beside 'identity'"),
    ({"identity": "a fox", "subject": ["tail"]}, "subject[0]", "is not in the identity prompt 'a fox'"),
    ({"identity": "a fox", "subject": {"fox": 1}}, "subject", "expected a list, got an object"),
    ({"identity": "a fox | fox", "subject": ["fox"]}, "subject", "given twice"),
]


@pytest.mark.parametrize("data, field, fragment", SUBJECT_JSON_ERRORS)
def test_subject_word_json_errors(data, field, fragment):
    data = {**data, "frames": ["[NC] x"]}
    for value in (data, json.dumps(data)):
        with pytest.raises(StoryError) as info:
            parse_story(value)
        assert (info.value.field, info.value.line) == (field, None)
        assert fragment in info.value.problem, info.value.problem


def test_lines_end_only_where_a_textarea_breaks_them():
    # The editor (a browser textarea) breaks lines at \n, \r\n and \r only; line numbers must agree with it.
    story = parse_story("a fox\r\nruns\u2028fast\x0bnow\rsleeps\x85deeply\n[NC] rain\x0c")
    assert [(f.prompt, f.line) for f in story.frames] == [("runs fast now", 2), ("sleeps deeply", 3), ("rain", 4)]
    with pytest.raises(StoryError, match="story line 3: unknown character tag"):
        parse_story("Bob: a man\u2029tall\n---\n[Bobb] walks")
    assert parse_story(["a fox", "runs\u2028fast"]).frames[0].prompt == "runs fast"
