"""Subjects: a reference image plus the phrase of the prompt that names it.

Dynamic routing needs to know which prompt tokens refer to which subject ("a dog and a cat":
"dog", "cat"). A phrase is located by text: the n-th occurrence when a phrase repeats ("a dog and
another dog": "dog" occurrence 0 and 1), or an explicit character span. The character span is then
mapped onto the T5 tokens through the tokenizer's offsets (:func:`phrase_token_span`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass
class Subject:
    """One subject: ``image`` (PIL image or path) and its ``phrase`` in the prompt.

    ``occurrence`` picks among repeated phrases (0-based); ``span`` = (start, end) character
    offsets in the prompt overrides the search. The condition prompt defaults to the phrase.
    """

    image: Image.Image | str | Path
    phrase: str
    occurrence: int | None = None
    span: tuple[int, int] | None = None
    condition_prompt: str | None = None

    @property
    def prompt(self) -> str:
        return self.condition_prompt or self.phrase


def phrase_char_span(prompt: str, subject: Subject) -> tuple[int, int]:
    """Character span of the subject's phrase in ``prompt``; a ValueError says what is wrong and how to fix it."""
    if subject.span is not None:
        start, end = subject.span
        if not (0 <= start < end <= len(prompt)):
            raise ValueError(f"subject {subject.phrase!r}: span {subject.span} lies outside the prompt ({len(prompt)} characters)")
        return start, end
    if not subject.phrase or not subject.phrase.strip():
        raise ValueError("every subject needs a non-empty phrase naming it in the prompt")
    starts = []
    pos = prompt.find(subject.phrase)
    while pos >= 0:
        starts.append(pos)
        pos = prompt.find(subject.phrase, pos + 1)
    if not starts:
        raise ValueError(f"subject phrase {subject.phrase!r} does not occur in the prompt {prompt!r}; "
                         "use the words the prompt uses for this subject")  # fmt: skip
    if subject.occurrence is None:
        if len(starts) > 1:
            raise ValueError(
                f"subject phrase {subject.phrase!r} occurs {len(starts)} times in the prompt; pass occurrence=0.."
                f"{len(starts) - 1} (or an explicit span) to say which one is this subject"
            )
        index = 0
    else:
        index = subject.occurrence
        if not 0 <= index < len(starts):
            raise ValueError(f"subject phrase {subject.phrase!r} occurs {len(starts)} times; occurrence {index} does not exist")
    return starts[index], starts[index] + len(subject.phrase)


def parse_subject_arg(text: str) -> Subject:
    """CLI form ``path=phrase`` or ``path=phrase@N`` (N = occurrence)."""
    path, sep, phrase = text.rpartition("=")
    if not sep or not path or not phrase:
        raise ValueError(f"--subject {text!r}: expected IMAGE_PATH=PHRASE (optionally PHRASE@OCCURRENCE)")
    occurrence = None
    if "@" in phrase:
        phrase, _, occ = phrase.rpartition("@")
        if not occ.isdigit():
            raise ValueError(f"--subject {text!r}: occurrence after '@' must be a number")
        occurrence = int(occ)
    return Subject(image=path, phrase=phrase, occurrence=occurrence)
