"""Reading the answer out of a generated text (evaluation's `generate` and `sc` modes).

`parse_answer(text, options)` returns an option letter for multiple choice (`options` given), or yes / no / maybe
for PubMedQA (no options) -- or None when the text does not name exactly one answer. In order, it takes:

1. what answer statements say: "The answer is (C)", "Answer: C.", "the correct option is d", "The answer is yes",
   "The answer is microcytic anaemia". Statements naming two different answers ("The answer is B or C", or a
   chain of thought that changes its mind) make the text unparseable.
2. a short reply (up to four words): "B", "(c)", "C.", "Option D" -- and "B or C" is unparseable.
3. a reply opening with a letter: "B. Glucose ..." / "(B) Glucose ...".
4. the text of exactly one option ("Microcytic anaemia" -> its letter); a match inside a longer matching option's
   text does not count.
For yes / no / maybe: the label the statements name, else the label the text mentions -- "maybe", "Yes.", "The
answer is no" -- and None when two different labels come up. Nothing else counts: a text that names no answer is
None, never a guess.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..data.pubmedqa import PUBMEDQA_LABELS

# An answer letter stands alone: upper case not inside a word ("Aspirin", "E-cadherin"); lower case not followed by
# a word either, so that the article "a" in "a bit" is no answer.
_LETTER = re.compile(r"[(\[]?\b(?:([A-E])(?![\w'-])|([a-e])(?![\w'-])(?!\)?\s+[a-z]))")
# "answer", "answer is", "answer:", "correct option is", ... then what it says, up to the end of the sentence
_STATEMENT = re.compile(
    r"\b(?:answer|correct (?:option|choice))\b(?:\s+is\b|\s*:|\s+-)?(.*?)(?=\.\s|\.$|\n|$)", re.IGNORECASE
)
_OPENING_LETTER = re.compile(r"\s*[(\[]?([A-E])(?:[)\]]|[.:](?=\s))")
_LABEL = re.compile(r"\b(yes|no|maybe)\b", re.IGNORECASE)


def _letters(text: str) -> list[str]:
    return [(upper or lower).upper() for upper, lower in _LETTER.findall(text)]


def _only(named: list[str], valid) -> str | None:
    """The answer when everything named is one and the same valid answer."""
    return named[0] if named and len(set(named)) == 1 and named[0] in valid else None


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w%]+", " ", text.lower()).split())


def _option_with_text(text: str, options: Mapping[str, str]) -> str | None:
    said = f" {_words(text)} "
    matched = {letter: _words(option) for letter, option in options.items()}
    matched = {letter: option for letter, option in matched.items() if option and f" {option} " in said}
    # "aspirin" inside a matching "aspirin and clopidogrel" is not a second answer
    outermost = [
        letter
        for letter, option in matched.items()
        if not any(option != other and f" {option} " in f" {other} " for other in matched.values())
    ]
    return outermost[0] if len(outermost) == 1 else None


def parse_answer(text: str | None, options: Mapping[str, str] | None = None) -> str | None:
    """The answer `text` gives: a letter of `options`, or yes / no / maybe when there are none; None if unparseable."""
    text = (text or "").strip()
    if not text:
        return None
    statements = [match.group(1) for match in _STATEMENT.finditer(text)]
    if not options:
        named = [label.lower() for statement in statements for label in _LABEL.findall(statement)]
        return _only(named or [label.lower() for label in _LABEL.findall(text)], PUBMEDQA_LABELS)
    named = [letter for statement in statements for letter in _letters(statement)]
    if named:
        return _only(named, options)
    by_text = {_option_with_text(statement, options) for statement in statements} - {None}
    if len(by_text) == 1:
        return by_text.pop()
    short_reply_letters = _letters(text) if len(text.split()) <= 4 else []
    if short_reply_letters:
        return _only(short_reply_letters, options)
    opening = _OPENING_LETTER.match(text)
    if opening:
        return _only([opening.group(1)], options)
    return _option_with_text(text, options)
