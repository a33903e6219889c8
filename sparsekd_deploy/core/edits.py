"""Meaning-preserving edits of a prompt, made by the project, for the sensitivity measurement: how much does the
next-token distribution move when the prompt changes in a way a reader would not notice?

The edits work on text, so they need the tokenizer: the prompt's token ids are decoded, the text is edited and
encoded again. The baseline every edit is compared with is the *re-encoded* original text (not the original ids), so
that the only difference between the two rows is the edit, not a change of tokenization. Leading special tokens
(a data-free prompt's BOS) are kept as they are and never edited.

- ``leading_space``: one space before the text;
- ``first_letter_case``: the case of the first letter swapped;
- ``trailing_punctuation``: a final ``.`` added (or, when the text already ends with a punctuation mark, removed);
- ``double_space``: the first space doubled;
- ``token_split``: the same text in more tokens — the baseline's longest token (in characters) re-encoded as its two
  halves, each encoded on its own (no synonym, no text change: only the segmentation differs).

``trailing_punctuation`` is a **control**, not part of the headline sensitivity: for next-token prediction a final
``.`` is not meaning-preserving — it ends the sentence, so the next token *should* change (the demo teacher's top-1
flips on most prompts and it carries ~90 % of the five edits' mean KL). A flatter student moves less under it for that
reason alone, which would reward flatness; it is recorded and reported separately (``CONTROL_EDITS``).

An edit that does not apply to a prompt (no letter, no space, no token of 2+ characters, an id outside the model's
vocabulary after re-encoding) is marked not applicable rather than replaced by something else. No torch: the
validation side only reads the rows recorded at build time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

PUNCTUATION = ".,;:!?"


def leading_space(text: str) -> str | None:
    return " " + text


def first_letter_case(text: str) -> str | None:
    for i, c in enumerate(text):
        if c.isalpha():
            swapped = c.swapcase()
            return None if swapped == c else text[:i] + swapped + text[i + 1 :]
    return None


def trailing_punctuation(text: str) -> str | None:
    if text and text[-1] in PUNCTUATION:
        return text[:-1] or None
    return text + "."


def double_space(text: str) -> str | None:
    i = text.find(" ")
    return None if i < 0 else text[:i] + " " + text[i:]


TEXT_EDITS: dict[str, Callable[[str], str | None]] = {
    "leading_space": leading_space, "first_letter_case": first_letter_case,
    "trailing_punctuation": trailing_punctuation, "double_space": double_space,
}
EDITS: tuple[str, ...] = (*TEXT_EDITS, "token_split")
# Edits measured and reported, but kept out of the headline sensitivity (see the module docstring).
CONTROL_EDITS: tuple[str, ...] = ("trailing_punctuation",)


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def token_split(tokenizer, ids: list[int]) -> list[int] | None:
    """``ids`` with its longest token (first of equals) replaced by the encodings of its two halves; None when no
    token has 2+ characters or the split does not decode to the same text. Special tokens are never split: "</s>"
    spelled out in plain characters decodes to the same text but is not the same token to the model."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    pieces = ["" if t in special else _decode(tokenizer, [t]) for t in ids]
    i = max(range(len(pieces)), key=lambda j: (len(pieces[j]), -j), default=None)
    if i is None or len(pieces[i]) < 2:
        return None
    k = len(pieces[i]) // 2
    new = ids[:i] + _encode(tokenizer, pieces[i][:k]) + _encode(tokenizer, pieces[i][k:]) + ids[i + 1 :]
    return new if new != ids and _decode(tokenizer, new) == _decode(tokenizer, ids) else None


def edit_prompt(tokenizer, ids: list[int]) -> list[list[int] | None]:
    """[baseline, *one row per edit in EDITS] token ids of one prompt (None: not applicable)."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    lead = 0
    while lead < len(ids) and ids[lead] in special:
        lead += 1
    head, body = list(ids[:lead]), list(ids[lead:])
    text = _decode(tokenizer, body)
    base = _encode(tokenizer, text) if text else []
    if not base:
        return [None] * (1 + len(EDITS))
    rows: list[list[int] | None] = [head + base]
    for fn in TEXT_EDITS.values():
        edited = fn(text)
        rows.append(head + _encode(tokenizer, edited) if edited else None)
    split = token_split(tokenizer, base)
    rows.append(head + split if split else None)
    return rows


@dataclass
class EditedPrompts:
    """Every prompt's baseline and edited rows, P × (1 + len(edits)) rows, prompt-major."""

    ids: np.ndarray  # [R, Lmax] int64, right-padded with 0 (a causal LM's last real position never sees the padding)
    lengths: np.ndarray  # [R] int64; 0 = not applicable
    edits: tuple[str, ...] = EDITS

    @property
    def per_prompt(self) -> int:
        return 1 + len(self.edits)


def edited_prompts(tokenizer, prompts, vocab_size: int | None = None) -> EditedPrompts:
    """Edit every row of ``prompts`` [P, L] (token ids); a row with an id ≥ ``vocab_size`` is not applicable."""
    rows = []
    for p in np.asarray(prompts).tolist():
        rows += [r if r is not None and (vocab_size is None or max(r) < vocab_size) else None
                 for r in edit_prompt(tokenizer, p)]
    width = max((len(r) for r in rows if r), default=1)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    lengths = np.zeros(len(rows), dtype=np.int64)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)], lengths[i] = r, len(r)
    return EditedPrompts(ids, lengths)
