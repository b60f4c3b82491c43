"""What each frame of a story will be, before generating (issue 12's frames preview), host-free.

One row per frame, computed by the same functions a generation uses (``plan_story_run``, ``plan_consolidation``,
``frames_share`` and the bank rules of ``story_diffusion.state`` / ``story_sync``): its prompt exactly as the image's
infotext will carry it (before the WebUI's own prompt styles), its seed, its batch (frames naming different extra
networks are in different batches, numbered in drawing order; ``batches.py``), whether it writes the reference
bank, which frames it takes attention from, and with 1Prompt1Story consolidation its token count and window.
Errors are the generation's own (``StoryError`` with the line, ``SettingsError`` with the field, the token budget).

``preview_panel`` renders the rows and the status line as the accordion's HTML; ``javascript/story_editor.js`` reads
the rows' ``data-*`` attributes (story line, token count) for its per-line counts and row selection.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..one_prompt_one_story.token_plan import (CHUNK_CONTENT_TOKENS, CLIP_CONTEXT, TextContext, TokenBudgetError,
                                               Tokenizer, TokenPlan, verify_token_plan)
from ..settings import Settings, SettingsError, option, option_keys
from ..story_diffusion.consistent_self_attention import frames_share
from .format import SHORTHAND_CHARACTER, StoryError
from .run import StoryRunPlan, plan_consolidation, plan_story_run, storysync_references, without_extra_networks


@dataclass(frozen=True)
class FramePreview:
    """One frame; frame numbers are 1-based, as in messages and captions."""
    number: int
    line: int | None                 # its story line (text form)
    characters: tuple[str, ...]      # () for [NC]
    caption: str
    prompt: str                      # the image's prompt (infotext), extra-network tags included
    seed: int
    batch: int                       # 1-based batch of the WebUI job
    reference: bool                  # writes the reference bank that later batches read
    shares_with: tuple[int, ...]     # frames whose self-attention tokens it receives
    tokens: int | None = None        # consolidation: tokens of its frame text
    window: tuple[int, ...] | None = None  # consolidation: frames in its consolidated prompt (its own first)
    count: int | None = None         # tokens of the text its image is encoded from (the host counter's number)
    limit: int | None = None         # the host counter's limit: 75 per CLIP chunk; 75 for a consolidated prompt


def sources(settings: Settings, plan: StoryRunPlan, frame: int) -> tuple[int, ...]:
    """0-based frames whose tokens ``frame`` receives under the settings' sharing method (every step that shares).

    CSA: its batch mates with a character in common; in a batch that reads the bank (one without reference frames,
    when there are some) the reference frames instead. StorySync: the same, restricted to its reference frames when
    it has any (Eq. 13), the frame itself never."""
    if not settings.csa:
        return ()
    groups = plan.frame_groups()
    batch = plan.batch_of(frame)
    references = storysync_references(settings, plan) if settings.masked_sharing else plan.reference_frames or None
    reads_bank = plan.bank_role(batch, references or ()) == "read"
    if reads_bank:
        candidates = references
    else:
        candidates = [f for f in plan.batch_frames(batch)
                      if not settings.masked_sharing or references is None or f in references]
    return tuple(f for f in candidates if f != frame and frames_share(groups, frame, f))


def preview_story(settings: Settings, style: str, seed: int, tokenize: Tokenizer | None = None,
                  context: TextContext = CLIP_CONTEXT) -> list[FramePreview]:
    """The frames of ``settings.story`` with ``style`` (the prompt box) and ``seed`` (already fixed, not -1).
    ``tokenize``: the checkpoint's CLIP-L tokenizer (Flux: T5's, with ``context``), for the token columns (None
    leaves them empty)."""
    plan = plan_story_run(settings, style, seed)
    return frame_rows(settings, plan, tokenize, consolidation_plan(settings, plan, tokenize, context), context)


def consolidation_plan(settings: Settings, plan: StoryRunPlan, tokenize: Tokenizer | None,
                       context: TextContext = CLIP_CONTEXT) -> TokenPlan | None:
    """The consolidated prompts' token plan (None without consolidation or tokenizer); TokenBudgetError."""
    if not settings.consolidate or tokenize is None:
        return None
    return plan_consolidation(settings, plan.story, without_extra_networks(plan.style), tokenize, context)


def frame_rows(settings: Settings, plan: StoryRunPlan, tokenize: Tokenizer | None = None,
               token_plan: TokenPlan | None = None, context: TextContext = CLIP_CONTEXT) -> list[FramePreview]:
    """One row per frame of ``plan``; the token columns need ``tokenize`` (and ``token_plan`` with consolidation).
    ``context``: the encoder the counts are against (CLIP: 75-token chunks; T5: its budget, no chunks)."""
    if settings.masked_sharing:
        references = storysync_references(settings, plan) or ()
    else:
        references = plan.reference_frames
    rows = []
    for i, frame in enumerate(plan.story.frames):
        count = limit = None
        if token_plan is not None:  # its image is encoded from its consolidated prompt (or window): one context
            count, limit = token_plan.frames[i].eot_start - context.first, context.budget
        elif tokenize is not None and not settings.consolidate:  # its own prompt (CLIP: in as many 75-token chunks)
            count = len(tokenize(without_extra_networks(plan.frame_prompts[i])))
            limit = context.budget if context is not CLIP_CONTEXT else \
                CHUNK_CONTENT_TOKENS * max(1, math.ceil(count / CHUNK_CONTENT_TOKENS))
        rows.append(FramePreview(
            number=i + 1, line=frame.line, characters=frame.characters, caption=frame.caption,
            prompt=plan.frame_prompts[i], seed=plan.seeds[i], batch=plan.batch_of(i) + 1,
            reference=settings.csa and i in references,
            shares_with=tuple(f + 1 for f in sources(settings, plan, i)),
            tokens=token_plan.frame_tokens[i] if token_plan else None,
            window=tuple(f + 1 for f in token_plan.frames[i].frames) if token_plan else None,
            count=count, limit=limit))
    return rows


# --- the accordion's HTML (javascript/story_editor.js reads the data-* attributes) ---------------------------------
# The table stays inside the accordion at any width: the text columns (#, characters, caption, prompt) break long
# words anywhere, so the table wraps; when its columns still cannot fit, `.cs-table` scrolls it sideways.

STYLE = """<style>
.cs-preview{color:var(--body-text-color);font-size:var(--text-sm,0.875rem)}
.cs-preview .cs-status{margin:0.25em 0}
.cs-preview .cs-error{color:var(--error-text-color,#dc2626);cursor:pointer}
.cs-preview .cs-table{max-height:28em;overflow:auto;border:1px solid var(--border-color-primary);border-radius:4px}
.cs-preview table{width:100%;border-collapse:collapse;margin:0}
.cs-preview th,.cs-preview td{padding:0.2em 0.45em;border-bottom:1px solid var(--border-color-primary);
  text-align:left;vertical-align:top;background:transparent;color:inherit}
.cs-preview th{position:sticky;top:0;background:var(--block-background-fill);font-weight:600;z-index:1}
.cs-preview tr.cs-frame[data-line]{cursor:pointer}
.cs-preview tr.cs-frame:hover td{background:var(--background-fill-secondary)}
.cs-preview tr.cs-selected td{outline:1px solid var(--color-accent,#f97316);outline-offset:-1px}
.cs-preview .cs-prompt{word-break:break-word;min-width:14em}
.cs-preview td:nth-child(-n+4){overflow-wrap:anywhere}
.cs-preview .cs-dim{color:var(--body-text-color-subdued)}
</style>"""


def story_hash(text: str) -> str:
    """32-bit FNV-1a over the UTF-16 code units of ``text`` (what JavaScript's ``charCodeAt`` reads), 8 hex digits:
    the editor shows a row's per-line count only while the story box still holds the text it was computed from."""
    h = 0x811C9DC5
    data = text.encode("utf-16-le", "surrogatepass")
    for i in range(0, len(data), 2):
        h = ((h ^ (data[i] | data[i + 1] << 8)) * 0x01000193) & 0xFFFFFFFF
    return f"{h:08x}"


def seed_of(value: Any) -> int | None:
    """The seed box's value as the host reads it; None for a random seed (-1, empty, not a number)."""
    try:
        seed = int(float(str(value).strip()))
    except (TypeError, ValueError, OverflowError):
        return None
    return seed if seed >= 0 else None


def preview_panel(args: Sequence[Any] | Mapping[str, Any], style: str, seed: Any,
                  tokenizers: Sequence[tuple[str, Tokenizer]] = (), context: TextContext = CLIP_CONTEXT) -> str:
    """The frames preview as HTML: a status line (counts, token budget, or the first error with its line) and a
    table with one row per frame. ``args``: the accordion's values in ``option_keys()`` order (or named, as the
    API); ``style``/``seed``: the WebUI's prompt and seed boxes; ``tokenizers``: the loaded model's (name,
    tokenizer) pairs, CLIP-L first (empty: no model, no token columns); Flux: T5's alone, with its ``context``.
    Every error is reported, never raised."""
    story_index = option_keys().index("story")
    text = (args.get("story") if isinstance(args, Mapping) else
            args[story_index] if len(args) > story_index else "") or ""
    if not isinstance(text, str) or not text.strip():
        return ""
    base = seed_of(seed)
    try:
        settings = Settings.from_dict(args) if isinstance(args, Mapping) else Settings.from_args(args)
        plan = plan_story_run(settings, style, base or 0)
    except StoryError as e:
        return _panel(text, _status(str(e), error=True, line=e.line), "")
    except SettingsError as e:
        label = option(e.field).label if e.field in option_keys() else e.field
        return _panel(text, _status(f"setting '{label}': {str(e).split(': ', 1)[-1]}", error=True), "")
    summary, status, rows = _summary(plan), None, None
    if tokenizers:
        try:
            token_plan = consolidation_plan(settings, plan, tokenizers[0][1], context)
            if token_plan is not None:
                for name, tokenize in tokenizers:
                    verify_token_plan(token_plan, tokenize, name)
                summary += "; " + token_plan.budget_line()
            rows = frame_rows(settings, plan, tokenizers[0][1], token_plan, context)
        except TokenBudgetError as e:  # the rows stay, without token columns
            line = plan.story.frames[e.frame].line if e.frame is not None and e.frame < plan.frame_count else None
            status = _status(f"{summary}; {e}", error=True, line=line)
    elif settings.consolidate:
        summary += "; token counts appear once a model is loaded"
    rows = rows or frame_rows(settings, plan)
    return _panel(text, status or _status(summary), _table(rows, settings, base))


def _summary(plan: StoryRunPlan) -> str:
    story, count = plan.story, plan.frame_count
    line = f"{count} frame{'s' * (count != 1)}"
    if not story.shorthand:
        line += f", {len(story.characters)} character{'s' * (len(story.characters) != 1)}"
    if plan.batch_count > 1:
        line += f", {plan.batch_count} batches of {plan.batch_size}" if plan.host_slices else \
            f", {plan.batch_count} batches of up to {plan.batch_size}, one set of extra networks each"
        if not plan.in_story_order:
            line += " (drawn in batch order; images and files in story order)"
        references = [f + 1 for f in plan.reference_frames]
        if len(references) == 1:
            line += f" (frame {references[0]} writes the reference bank)"
        elif references:
            runs = f"{references[0]}-{references[-1]}" if references[-1] - references[0] == len(references) - 1 \
                else _numbers(references)
            line += f" (frames {runs} write the reference bank)"
    return line


def _status(message: str, error: bool = False, line: int | None = None) -> str:
    if not error:
        return f'<p class="cs-status">{html.escape(message)}</p>'
    where = f' data-line="{line}" title="Click to select story line {line}"' if line is not None else ""
    return f'<p class="cs-status cs-error"{where}>&#9888; {html.escape(message)}</p>'


def _panel(text: str, status: str, table: str) -> str:
    return f'<div class="cs-preview" data-story-hash="{story_hash(text)}">{STYLE}{status}{table}</div>'


def _numbers(values: Sequence[int]) -> str:
    """Frame numbers with consecutive runs joined: (1, 2, 3, 5, 9, 10) -> "1-3, 5, 9-10"."""
    if not values:
        return '<span class="cs-dim">none</span>'
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def _table(rows: Sequence[FramePreview], settings: Settings, seed: int | None) -> str:
    sharing, tokens = settings.csa, any(r.count is not None for r in rows)
    windows = any(r.window is not None for r in rows)
    head = ["#", "Characters", "Caption", "Prompt (as in the image's infotext)", "Seed", "Batch"]
    head += ["Shares attention with"] * sharing + ["Tokens"] * tokens + ["Window"] * windows
    body = []
    for r in rows:
        who = ", ".join(html.escape(c) for c in r.characters if c != SHORTHAND_CHARACTER or len(r.characters) > 1)
        who = who or ("identity" if r.characters else '<span class="cs-dim">[NC]</span>')
        seed_text = str(r.seed) if seed is not None else "random" + (f" + {r.seed}" if r.seed else "")
        batch = f"{r.batch}" + (' <span title="writes the reference bank later batches read">(reference)</span>'
                                if r.reference else "")
        cells = [str(r.number), who, html.escape(r.caption), f'<span class="cs-prompt">{html.escape(r.prompt)}</span>',
                 seed_text, batch]
        if sharing:
            cells.append(_numbers(r.shares_with))
        if tokens:
            cells.append(f"{r.count}/{r.limit}" if r.count is not None else "")
        if windows:
            cells.append(_numbers(r.window or ()))
        body.append(f'<tr class="cs-frame"{_data(r)}>' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    header = "".join(f"<th>{h}</th>" for h in head)
    return f'<div class="cs-table"><table><thead><tr>{header}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _data(row: FramePreview) -> str:
    data = f' data-frame="{row.number}"'
    if row.line is not None:
        data += f' data-line="{row.line}" title="Click to select story line {row.line}"'
    if row.count is not None:
        data += f' data-count="{row.count}" data-limit="{row.limit}"'
    return data
