"""The story format: the characters and frames a user types, parsed into a validated ``Story``.

Text form (line numbers in errors are the physical 1-based lines of the input). Blank lines and lines whose first
non-space characters are ``//`` are ignored everywhere.

Single-character shorthand (the 1Prompt1Story form; no line is ``---``)::

    a photo of a red fox | fox                 <- identity prompt (the implicit character "main"), subject words
    sitting in the snow                        <- one frame per line, each showing "main"
    [NC] an empty forest at dawn # the end     <- [NC]: no character; text after " # " is the caption

Named characters (StoryDiffusion-style comics)::

    Bob: a man with a beard, blue coat         <- ``Name: description``, at most MAX_CHARACTERS lines
    Alice: a woman with red hair | woman, hair <- optional: her subject words, after " | "
    ---
    [Bob] reading a newspaper # Monday
    [Bob] and [Alice] having lunch             <- several tags; order of first appearance
    [NC] a rainy street

Rules:

- A frame line may carry ``[Name]`` tags anywhere before its caption; they are removed from the prompt, which is then
  whitespace-collapsed. Tags match defined names case-insensitively. In the named form every frame needs at least one
  tag (``[NC]`` for none; it cannot be combined with a name). In the shorthand only ``[NC]`` is a tag. A bracket that
  looks like a name, e.g. A1111's ``[word]`` de-emphasis, is read as a tag; use ``(word:0.9)`` instead. Brackets with
  other content (``[a:b:0.5]``, ``[a|b]``) are prompt text.
- The caption is the text after the first `` # `` (space, hash, space; a trailing `` #`` gives an empty caption).
  Tags inside the caption are caption text.
- Names start with a letter, then letters, digits, ``_``, ``-`` or spaces, at most 32 characters; ``NC`` is reserved
  and names are unique regardless of case.
- Subject words (StorySync's subject tokens, paper §3.1; methods.md §5.1 step 1): a description or the identity
  line may end with `` | `` (space, bar, space) and a comma-separated list of at most MAX_SUBJECT_WORDS words or
  short phrases, each occurring in the description as whole words (case-insensitive). They are not prompt text.
  Without them every content word of the description is the subject (``subject_tokens.FUNCTION_WORDS`` are left
  out). Only `` | `` with spaces separates: A1111's ``[a|b]`` stays prompt text, and frame lines keep `` | `` as text.
- Limits: at most MAX_FRAMES (100) frames and MAX_CHARACTERS (8) characters; every prompt text (identity line,
  description, frame prompt) at most MAX_PROMPT_CHARS (1000) characters. Descriptions and the identity line take no
  tags and no caption; no prompt text may contain `` # ``, start with ``//`` or be ``---`` (it would not read back).

JSON form (any ``str`` starting with ``{`` is read as JSON, so put a ``//`` comment first to force the text form)::

    {"characters": {"Bob": "a man ...", "Alice": "a woman ..."},
     "frames": [{"prompt": "having lunch", "characters": ["Bob", "Alice"], "caption": "Monday"},
                "[NC] a rainy street # the end"]}
    {"identity": "a photo of a red fox", "subject": ["fox"],
     "frames": [{"prompt": "in the snow"}, {"prompt": "a forest", "characters": []}]}

A character's value is its description (a string, read like a text description line, so `` | `` works there too)
or ``{"description": "...", "subject": ["word", ...]}``; the shorthand's ``"subject"`` sits beside ``"identity"``
(an empty list means the default rule).

A frame is an object (``characters`` may be omitted only in the shorthand, meaning ``["main"]``; ``[]`` means no
character) or a string read like a text frame line. Errors name the field path, e.g. ``frames[3].characters[1]``
or ``characters.Bob.subject[0]``. Every malformed input raises ``StoryError``; nothing is guessed. Build stories with
``parse_story`` (``Story`` itself does not validate).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

MAX_FRAMES = 100
MAX_CHARACTERS = 8
MAX_PROMPT_CHARS = 1000
MAX_NAME_CHARS = 32
NO_CHARACTER_TAG = "NC"
SHORTHAND_CHARACTER = "main"  # the implicit character of the single-character shorthand
SEPARATOR = "---"
CAPTION_MARKER = " # "
SUBJECT_MARKER = " | "
MAX_SUBJECT_WORDS = 16

# Lines end at \n, \r\n or \r only, as in a browser's textarea (the editor counts lines the same way); other
# Unicode separators (U+2028, \v, \f...) are whitespace inside a line.
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_NAME = re.compile(r"[^\W\d_][\w\- ]*")
_TAG = re.compile(r"\[\s*([^\W\d_][\w\- ]*?)\s*\]")
_JSON_TYPES = {str: "a string", list: "a list", dict: "an object", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}  # how a value reads in messages
_REQUIRED = object()

_Where = int | str | None  # a 1-based line of the text form, a field path of the JSON form, or neither


class StoryError(ValueError):
    """A malformed story: ``line`` (text form, 1-based) or ``field`` (JSON path), and the ``problem``."""

    def __init__(self, problem: str, *, line: int | None = None, field: str | None = None) -> None:
        self.problem, self.line, self.field = problem, line, field
        where = f"story line {line}" if line is not None else f"story field {field}" if field else "story"
        super().__init__(f"{where}: {problem}")


def _error(where: _Where, problem: str) -> StoryError:
    return StoryError(problem, line=where) if isinstance(where, int) else StoryError(problem, field=where)


@dataclass(frozen=True)
class Character:
    name: str
    description: str  # prompt text describing the character, e.g. "a man with a beard, blue coat"
    subject: tuple[str, ...] = ()  # chosen subject words/phrases, each in the description; () = the default rule


@dataclass(frozen=True)
class Frame:
    prompt: str  # the frame's own text: no tags, no caption, whitespace collapsed
    characters: tuple[str, ...]  # canonical names of the characters in the frame; () for [NC]
    caption: str = ""
    line: int | None = dataclasses.field(default=None, compare=False)  # text-form line, for messages


@dataclass(frozen=True)
class Story:
    characters: tuple[Character, ...]  # definition order; the shorthand has one, named "main"
    frames: tuple[Frame, ...]
    shorthand: bool  # True for the single-character (1Prompt1Story) form

    @property
    def identity_prompt(self) -> str:
        """The shorthand's identity line, or the characters' descriptions joined with " and "."""
        return " and ".join(c.description for c in self.characters)

    def character(self, name: str) -> Character:
        """The character called ``name`` (case-insensitive); KeyError if there is none."""
        for c in self.characters:
            if c.name.casefold() == name.casefold():
                return c
        raise KeyError(f"no character {name!r} (defined: {', '.join(c.name for c in self.characters)})")

    def frame_groups(self) -> list[frozenset[str]]:
        """Per frame, the names of the characters in it (empty for [NC] frames)."""
        return [frozenset(f.characters) for f in self.frames]

    def frame_prompt(self, i: int, style: str = "") -> str:
        """Frame ``i``'s full prompt: style, its characters' descriptions, its text; joined with ", "."""
        frame = self.frames[i]
        described = ", ".join(self.character(n).description for n in frame.characters)
        return ", ".join(part for part in (_clean(style), described, frame.prompt) if part)

    def to_text(self) -> str:
        """The text form: the shorthand for shorthand stories, the named form otherwise."""
        lines = [_with_subject(c) for c in self.characters[:1]] if self.shorthand else \
            [f"{c.name}: {_with_subject(c)}" for c in self.characters] + [SEPARATOR]
        for f in self.frames:
            tags = "" if self.shorthand and f.characters else \
                "".join(f"[{n}] " for n in f.characters or (NO_CHARACTER_TAG,))
            lines.append(tags + f.prompt + (CAPTION_MARKER + f.caption if f.caption else ""))
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form as plain data; ``parse_story(story.to_dict()) == story``."""
        if self.shorthand:
            chosen = [w for c in self.characters[:1] for w in c.subject]
            head: dict[str, Any] = {"identity": self.identity_prompt, **({"subject": chosen} if chosen else {})}
        else:
            head = {"characters": {c.name: {"description": c.description, "subject": list(c.subject)} if c.subject
                                   else c.description for c in self.characters}}
        frames = [{"prompt": f.prompt, "characters": list(f.characters),
                   **({"caption": f.caption} if f.caption else {})} for f in self.frames]
        return {**head, "frames": frames}

    def to_json(self) -> str:
        """``to_dict()`` as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)


def parse_story(value: str | dict[str, Any] | list[str]) -> Story:
    """Parse a story from its text form, its JSON text or data, or a list of text-form lines."""
    if isinstance(value, str):
        if not value.lstrip().startswith("{"):
            return _parse_text(value)
        try:
            data = json.loads(value)
        except json.JSONDecodeError as e:
            raise StoryError(f"invalid JSON: {e.msg} (column {e.colno}); a story starting with '{{' is read as JSON",
                             line=e.lineno) from None
        return _parse_json(data)
    if isinstance(value, dict):
        return _parse_json(value)
    if isinstance(value, (list, tuple)):
        for i, line in enumerate(value):
            if not isinstance(line, str):
                raise StoryError(f"expected a line of text, got {type(line).__name__}", field=f"[{i}]")
            if _LINE_BREAK.search(line):
                raise StoryError("a line of a list of lines contains a line break", field=f"[{i}]")
        return _parse_text("\n".join(value))
    raise StoryError(f"expected story text, a JSON object or a list of lines, got {type(value).__name__}")


# --- shared pieces -------------------------------------------------------------------------------------------------

_Cast = dict[str, Character]  # the defined characters keyed by casefolded name, in definition order


def _clean(text: str) -> str:
    return " ".join(text.split())


def _defined(cast: _Cast) -> str:
    return ", ".join(c.name for c in cast.values())


def _check_text(text: str, where: _Where, what: str) -> str:
    """Collapse whitespace in one piece of prompt text and check that it is non-empty, short and reads back."""
    text = _clean(text)
    if not text:
        raise _error(where, f"{what} is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise _error(where, f"{what} is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}")
    if tag := _TAG.search(text):
        raise _error(where, f"{what} contains {tag.group(0)}, which would be read as a character tag")
    if CAPTION_MARKER in f" {text} ":
        raise _error(where, f"{what} contains ' # ', which would be read as the start of a caption")
    if text.startswith("//") or text == SEPARATOR:
        raise _error(where, f"{what} starts with '//' or is '---', which would not read back as text")
    return text


def _with_subject(character: Character) -> str:
    """The description as a text-form line reads it: ``description | word, word`` when words were chosen."""
    words = SUBJECT_MARKER + ", ".join(character.subject) if character.subject else ""
    return character.description + words


def _character(name: str, text: str, where: _Where, what: str, whose: str,
               listed: list[Any] | None = None, listed_where: str | None = None) -> Character:
    """A checked character from its description ``text`` (optionally ending in `` | word, word``) and, in the JSON
    object form, the ``listed`` subject words at ``listed_where``. ``what``/``whose`` name the text in messages."""
    body, bar, tail = f" {_clean(text)} ".partition(SUBJECT_MARKER)
    description = _check_text(body, where, what)
    if bar and listed is not None:
        raise _error(listed_where, f"subject words are given twice: after ' | ' in {whose} and in 'subject'")
    if bar and not _clean(tail):
        raise _error(where, f"nothing after ' | ' in {whose}: list the subject words or remove the bar")
    words = tail.split(",") if bar else list(listed or [])
    places = [where] * len(words) if bar else [f"{listed_where}[{j}]" for j in range(len(words))]
    if len(words) > MAX_SUBJECT_WORDS:
        raise _error(where if bar else listed_where, f"{len(words)} subject words for {whose}; the limit is "
                                                     f"{MAX_SUBJECT_WORDS} (MAX_SUBJECT_WORDS)")
    subject: list[str] = []
    for k, (word, place) in enumerate(zip(words, places), 1):
        word = _clean(_expect(word, str, place))
        if not word:
            raise _error(place, f"subject word {k} of {whose} is empty")
        if "," in word:  # only a JSON item can hold one; it would not read back as text
            raise _error(place, f"subject word {word!r} contains ','; list each word or phrase separately")
        if not re.search(rf"(?<![^\W_]){re.escape(word)}(?![^\W_])", description, re.IGNORECASE):
            raise _error(place, f"subject word {word!r} is not in {whose} {description!r}")
        if word.casefold() in (w.casefold() for w in subject):
            raise _error(place, f"subject word {word!r} is listed twice for {whose}")
        subject.append(word)
    return Character(name, description, tuple(subject))


def _define(cast: _Cast, name: str, description: str, where: _Where, listed: list[Any] | None = None,
            text_where: str | None = None) -> None:
    """Add one named character to ``cast``, checking its name, its description (at ``text_where``, default
    ``where``), its subject words and the character limit."""
    name = _clean(name)
    if not _NAME.fullmatch(name) or len(name) > MAX_NAME_CHARS:
        raise _error(where, f"invalid character name {name!r}: a name starts with a letter, then letters, digits, "
                            f"'_', '-' or spaces, at most {MAX_NAME_CHARS} characters")
    if name.casefold() == NO_CHARACTER_TAG.casefold():
        raise _error(where, f"the name {name!r} is reserved: [{NO_CHARACTER_TAG}] marks a frame without characters")
    if name.casefold() in cast:
        raise _error(where, f"character {name!r} is defined twice (names are case-insensitive)")
    if len(cast) == MAX_CHARACTERS:
        raise _error(where, f"more than {MAX_CHARACTERS} characters (MAX_CHARACTERS)")
    text_where = where if text_where is None else text_where
    cast[name.casefold()] = _character(name, description, text_where, f"description of {name}",
                                       f"{name}'s description", listed, f"{where}.subject")


def _shorthand_cast(identity: str, where: _Where, listed: list[Any] | None = None) -> _Cast:
    return {SHORTHAND_CHARACTER: _character(SHORTHAND_CHARACTER, identity, where, "identity prompt",
                                            "the identity prompt", listed, "subject")}


def _resolve(cast: _Cast, name: str, where: _Where, shown: str) -> str:
    """The canonical name of a defined character; ``shown`` is how the reference reads in the message."""
    character = cast.get(_clean(name).casefold())
    if character is None:
        raise _error(where, f"unknown character {shown} (defined: {_defined(cast)})")
    return character.name


def _frame_from_line(text: str, cast: _Cast, shorthand: bool, where: _Where) -> Frame:
    """Parse one text-form frame line (or a JSON frame given as a string)."""
    body, _, caption = f" {text} ".partition(CAPTION_MARKER)
    tags = _TAG.findall(body)
    prompt = _clean(_TAG.sub(" ", body))
    names: list[str] = []
    if any(t.casefold() == NO_CHARACTER_TAG.casefold() for t in tags):
        if any(t.casefold() != NO_CHARACTER_TAG.casefold() for t in tags):
            raise _error(where, f"[{NO_CHARACTER_TAG}] (no character) cannot be combined with character tags")
    elif shorthand:
        if tags:
            raise _error(where, f"unknown character tag [{tags[0]}]: the single-character form only knows "
                                f"[{NO_CHARACTER_TAG}]; named characters need 'Name: description' lines and '---'")
        names = [SHORTHAND_CHARACTER]
    elif not tags:
        raise _error(where, f"frame has no character tag: add [Name] (defined: {_defined(cast)}) "
                            f"or [{NO_CHARACTER_TAG}] for a frame without characters")
    else:
        names = [_resolve(cast, t, where, f"tag [{t}]") for t in tags]
    if not prompt:
        raise _error(where, "frame has no prompt text, only tags or a caption")
    line = where if isinstance(where, int) else None
    return Frame(_check_text(prompt, where, "frame prompt"), tuple(dict.fromkeys(names)), _clean(caption), line)


# --- text form -----------------------------------------------------------------------------------------------------

def _parse_text(text: str) -> Story:
    lines = [(n, s.strip()) for n, s in enumerate(_LINE_BREAK.split(text), 1)
             if s.strip() and not s.strip().startswith("//")]
    if not lines:
        raise StoryError("no identity line: the text is empty or only comments")
    separators = [i for i, (_, s) in enumerate(lines) if s == SEPARATOR]
    if len(separators) > 1:
        raise _error(lines[separators[1]][0], "a second '---' line: one '---' separates characters from frames")
    if separators:
        k = separators[0]
        header, body, shorthand = lines[:k], lines[k + 1:], False
        if not header:
            raise _error(lines[k][0], "'---' with no 'Name: description' lines before it")
        cast: _Cast = {}
        for n, s in header:
            name, colon, description = s.partition(":")
            if not colon:
                raise _error(n, f"expected 'Name: description' before '---', got {s!r}")
            _define(cast, name, description, n)
    else:
        (n, identity), body, shorthand = lines[0], lines[1:], True
        cast = _shorthand_cast(identity, n)
    if not body:
        raise _error(lines[-1][0], "no frames: add one frame per line after "
                                   + ("'---'" if separators else "the identity line"))
    if len(body) > MAX_FRAMES:
        raise _error(body[MAX_FRAMES][0], f"more than {MAX_FRAMES} frames (MAX_FRAMES)")
    frames = tuple(_frame_from_line(s, cast, shorthand, n) for n, s in body)
    return Story(tuple(cast.values()), frames, shorthand)


# --- JSON form -----------------------------------------------------------------------------------------------------

def _expect(value: Any, kind: type, where: str) -> Any:
    if not isinstance(value, kind):
        raise _error(where, f"expected {_JSON_TYPES[kind]}, got {_JSON_TYPES.get(type(value), type(value).__name__)}")
    return value


def _get(obj: dict[str, Any], key: str, kind: type, path: str, default: Any = _REQUIRED) -> Any:
    where = f"{path}.{key}" if path else key
    if key not in obj:
        if default is _REQUIRED:
            raise _error(where, "missing")
        return default
    return _expect(obj[key], kind, where)


def _check_keys(obj: dict[str, Any], allowed: tuple[str, ...], path: str) -> None:
    for key in obj:
        if key not in allowed:
            raise _error(f"{path}.{key}" if path else str(key), f"unknown key {key!r} (allowed: {', '.join(allowed)})")


def _frame_from_object(item: dict[str, Any], cast: _Cast, shorthand: bool, path: str) -> Frame:
    _check_keys(item, ("prompt", "characters", "caption"), path)
    prompt = _check_text(_get(item, "prompt", str, path), f"{path}.prompt", "frame prompt")
    listed = _get(item, "characters", list, path, None)
    if listed is None and not shorthand:
        raise _error(f"{path}.characters", "missing: list the frame's characters ([] for none)")
    names = [SHORTHAND_CHARACTER] if listed is None else \
        [_resolve(cast, _expect(name, str, f"{path}.characters[{j}]"), f"{path}.characters[{j}]", repr(name))
         for j, name in enumerate(listed)]
    return Frame(prompt, tuple(dict.fromkeys(names)), _clean(_get(item, "caption", str, path, "")))


def _parse_json(data: dict[str, Any]) -> Story:
    _check_keys(data, ("characters", "identity", "subject", "frames"), "")
    if ("characters" in data) == ("identity" in data):
        raise StoryError("give either 'characters' (named characters) or 'identity' (single character), "
                         + ("not both" if "identity" in data else "found neither"))
    shorthand = "identity" in data
    if shorthand:
        cast = _shorthand_cast(_get(data, "identity", str, ""), "identity", _get(data, "subject", list, "", None))
    else:
        if "subject" in data:
            raise _error("subject", "'subject' goes beside 'identity'; give a named character's subject words as "
                                    "{\"description\": \"...\", \"subject\": [...]}")
        cast = {}
        for name, value in _get(data, "characters", dict, "").items():
            where = f"characters.{name}"
            if isinstance(value, dict):
                _check_keys(value, ("description", "subject"), where)
                _define(cast, name, _get(value, "description", str, where), where,
                        _get(value, "subject", list, where, None), f"{where}.description")
            else:
                _define(cast, name, _expect(value, str, where), where)
        if not cast:
            raise _error("characters", "no characters defined")
    items = _get(data, "frames", list, "")
    if not items:
        raise _error("frames", "no frames")
    if len(items) > MAX_FRAMES:
        raise _error("frames", f"more than {MAX_FRAMES} frames (MAX_FRAMES)")
    frames = tuple(_frame_from_line(item, cast, shorthand, f"frames[{i}]") if isinstance(item, str) else
                   _frame_from_object(_expect(item, dict, f"frames[{i}]"), cast, shorthand, f"frames[{i}]")
                   for i, item in enumerate(items))
    return Story(tuple(cast.values()), frames, shorthand)
