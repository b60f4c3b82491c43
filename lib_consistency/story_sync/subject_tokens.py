"""StorySync subject tokens: the positions of each character's subject in a conditioning prompt.

Paper: StorySync (Gaur et al., arXiv 2508.03735) §3.1 Eqs. 2-4: a frame's subject mask comes from the
cross-attention maps of its subject tokens s ∈ S; methods.md §5.1 step 1. The paper does not say how S is chosen.

(our choice) A character's S is, inside its own description and nowhere else in the prompt:
- with chosen subject words (story syntax ``description | word, phrase``, ``Character.subject``): every occurrence
  of each word's token sequence;
- otherwise every token of the description except function words (``FUNCTION_WORDS``) and punctuation.

A prompt is given as pieces ``(text, owner)`` (owner: a character name for its description, None for style text,
separators and frame text). Positions are recorded while joining, as in ``token_plan``, never searched for in the
whole prompt: each piece is tokenised alone and offsets are added after SOT. The whole prompt is then tokenised once
to verify that it is the pieces' tokens in order (up to the token after the last description, where a seam would
show; later text may run into a second chunk). Tokens are compared by id, plus the embedding name where the host
gives ``(id, emphasis weight, embedding name)``; emphasis weights are ignored.

Function-wordness needs no vocabulary: each whitespace-separated word of a description is tokenised alone, split
into its letter/digit runs and punctuation runs, and those labelled tokens are aligned to the description's own
tokens (longest matching blocks, ``difflib``), so host syntax that the tokenizer consumes (A1111 emphasis brackets
and weights) simply finds no partner and drops out.
"""
from __future__ import annotations

import difflib
import re
from typing import Callable, Mapping, Sequence

from ..one_prompt_one_story.token_plan import CHUNK_CONTENT_TOKENS, Tokenizer
from ..story.format import Story
from ..story.run import EXTRA_NETWORK_TAG

Piece = tuple[str, "str | None"]  # (text, owner): owner is a character name for its description, else None
_Key = tuple[int, object]  # what identifies a token here: (id, embedding name or None)

FUNCTION_WORDS = frozenset("""
    a an the this that these those some any each every another such
    of in on at to for from by with without into onto upon over under above below behind beside besides between
    among around through across along near against about after before during inside outside within toward towards
    via as than up down off out
    and or but nor so yet while if because which who whom whose
    i me my mine you your yours he him his she her hers it its they them their theirs we us our ours
    himself herself itself themselves
    is are was were be been being am has have had do does did will would can could should may might must shall
    not very also just there here then
    's 't 're 've 'm 'll 'd
""".split())

# The runs of one word: clitics as CLIP splits them off, then letter/digit runs and punctuation runs.
_RUN = re.compile(r"'(?:s|t|re|ve|m|ll|d)(?![^\W_])|[^\W_]+|[\W_]+", re.IGNORECASE)
_ALNUM = re.compile(r"[^\W_]")


def _key(item: object) -> _Key:
    if isinstance(item, tuple):
        return int(item[0]), item[2] if len(item) > 2 else None
    return int(item), None  # type: ignore[call-overload]  (an int-like id)


def _is_subject(text: str) -> bool:
    """A run or word counts as subject when it has a letter or digit and is no function word."""
    return bool(_ALNUM.search(text)) and text.casefold() not in FUNCTION_WORDS


def _word_labels(word: str, keys: Callable[[str], list[_Key]]) -> list[tuple[_Key, bool]]:
    """(token, is subject) for one whitespace-separated word of a description, tokenised alone."""
    runs = _RUN.findall(word)
    per_run = [keys(run) for run in runs]
    if [k for ks in per_run for k in ks] == keys(word):
        return [(k, _is_subject(run)) for run, ks in zip(runs, per_run) for k in ks]
    # The tokenizer joins runs (CLIP's "'s"): the word is one unit, judged without the punctuation at its ends.
    core = re.sub(r"^[\W_]+|[\W_]+$", "", word)
    return [(k, _is_subject(core)) for k in keys(word)]


def _default_subject(text: str, tokens: list[_Key], keys: Callable[[str], list[_Key]]) -> list[int]:
    """Indices into ``tokens`` (the description's tokens) of its tokens that are neither function words nor
    punctuation; tokens the word-by-word tokenisation has no partner for are left out."""
    labels = [label for word in text.split() for label in _word_labels(word, keys)]
    matcher = difflib.SequenceMatcher(None, [k for k, _ in labels], tokens, autojunk=False)
    return [b + j for a, b, size in matcher.get_matching_blocks() for j in range(size) if labels[a + j][1]]


def _occurrences(needle: list[_Key], tokens: list[_Key]) -> list[int]:
    """Indices into ``tokens`` covered by any occurrence of ``needle`` (overlaps allowed)."""
    n = len(needle)
    return [i + j for i in range(len(tokens) - n + 1) if tokens[i:i + n] == needle for j in range(n)]


def subject_positions(pieces: Sequence[Piece], tokenize: Tokenizer, subjects: Mapping[str, Sequence[str]],
                      first: int = 1, limit: int | None = CHUNK_CONTENT_TOKENS) -> dict[str, tuple[int, ...]]:
    """Each owner's subject-token positions in the 77-token context of ``"".join(text for text, _ in pieces)``.

    Args:
        pieces: (text, owner) in prompt order; owner is a character name for its description, None otherwise.
        tokenize: the host tokenizer, text -> tokens without SOT/EOT; a token is an int id or a tuple whose first
            element is the id (hosts give (id, emphasis weight, embedding name)).
        subjects: chosen subject words per character name; missing or empty means the default rule.

        first: the context position of the prompt's first token: 1 for CLIP (SOT is 0), 0 for T5 (no start token).
        limit: the last position a subject token may take (CLIP: the first chunk's 75 tokens); None: no limit (T5
            in Forge: the context grows with the prompt).

    Returns ``{owner: sorted positions}`` in order of first appearance, positions in the text context. Raises ValueError naming the character when a chosen word is not among its description's
    tokens, when the default rule finds no token, when a subject token lies beyond the first 75 tokens, or when its
    description does not tokenise the same inside the prompt.
    """
    cache: dict[str, list[_Key]] = {}

    def keys(text: str) -> list[_Key]:
        if text not in cache:
            cache[text] = [_key(t) for t in tokenize(text)] if text.strip() else []
        return cache[text]

    tokens = [keys(text) for text, _ in pieces]
    # A piece starts where the tokens of everything before it end: exact even when punctuation before it merges
    # across a seam ('hat.' then ', ' is one token), since CLIP never merges across the whitespace that precedes
    # a description.
    starts = [first + len(keys("".join(text for text, _ in pieces[:p]))) for p in range(len(pieces))]
    result: dict[str, tuple[int, ...]] = {}
    for owner in dict.fromkeys(o for _, o in pieces if o is not None):
        mine = [p for p, (_, o) in enumerate(pieces) if o == owner]
        description = pieces[mine[0]][0]
        words = tuple(subjects.get(owner, ()))
        found: set[int] = set()
        for word in words:
            needle = keys(word)
            hits = {starts[p] + i for p in mine for i in _occurrences(needle, tokens[p])} if needle else set()
            if not hits:
                raise ValueError(f"subject word {word!r} of {owner} is not among the tokens of its description "
                                 f"{description!r}")
            found |= hits
        if not words:
            found = {starts[p] + i for p in mine for i in _default_subject(pieces[p][0], tokens[p], keys)}
            if not found:
                raise ValueError(f"{owner}'s description {description!r} has no subject tokens (only function "
                                 f"words and punctuation); choose subject words after ' | '")
        if limit is not None and max(found) > limit:
            raise ValueError(f"{owner}: its description lies beyond the first {limit} tokens of the "
                             f"prompt (a subject token at position {max(found)}); shorten the text before it")
        result[owner] = tuple(sorted(found))
    if result:
        _verify(pieces, tokens, starts, result, keys("".join(text for text, _ in pieces)), first)
    return result


def _verify(pieces: Sequence[Piece], tokens: list[list[_Key]], starts: list[int], result: dict[str, tuple[int, ...]],
            joined: list[_Key], first: int = 1) -> None:
    """Every subject position must hold, in the whole prompt's tokens, the token its description put there;
    otherwise ValueError naming the character (a bracket or an embedding name running across its ends)."""
    expected: dict[int, _Key] = {}
    for p, (_, owner) in enumerate(pieces):
        if owner is not None:
            expected.update({starts[p] + i: key for i, key in enumerate(tokens[p])})
    for owner, positions in result.items():
        wrong = [pos for pos in positions if pos - first >= len(joined) or joined[pos - first] != expected[pos]]
        if wrong:
            text = next(t for t, o in pieces if o == owner)
            raise ValueError(f"{owner}'s description {text!r} does not tokenise the same inside the prompt (token "
                             f"{wrong[0]} differs): an emphasis bracket or an embedding name does not open and "
                             f"close within it")


# --- pieces of the prompts a story builds --------------------------------------------------------------------------

def story_subjects(story: Story) -> dict[str, tuple[str, ...]]:
    """Chosen subject words per character name (empty: the default rule), for ``subject_positions``."""
    return {c.name: c.subject for c in story.characters}


def _described(story: Story, names: Sequence[str], separator: str) -> list[Piece]:
    out: list[Piece] = []
    for name in names:
        character = story.character(name)
        out += [(separator, None)] if out else []
        out.append((_bare(character.description), character.name))
    return out


def _bare(text: str) -> str:
    """``text`` as the host tokenises it: extra-network tags (``<lora:…>``) removed, nothing else touched."""
    return EXTRA_NETWORK_TAG.sub("", text)


def _join(groups: Sequence[list[Piece]], separator: str) -> list[Piece]:
    """The pieces of ``separator.join(group texts)`` over the groups whose text is not empty."""
    out: list[Piece] = []
    for group in groups:
        if "".join(text for text, _ in group):
            out += ([(separator, None)] if out else []) + group
    return out


def frame_prompt_pieces(story: Story, i: int, style: str = "") -> list[Piece]:
    """Pieces of ``story.frame_prompt(i, style)``: style, the frame's characters' descriptions, its text."""
    frame = story.frames[i]
    return _join([[(" ".join(style.split()), None)], _described(story, frame.characters, ", "),
                  [(_bare(frame.prompt), None)]], ", ")


def consolidated_identity_pieces(story: Story, style: str = "") -> list[Piece]:
    """Pieces of ``story.run.consolidation_identity(style, story)``: style, then every description joined with
    " and ". The 1P1S consolidated prompt starts with it, so its positions hold there too (append the frame texts as
    owner-less pieces to have them verified as well)."""
    return _join([[(" ".join(style.split()), None)],
                  _described(story, [c.name for c in story.characters], " and ")], ", ")
