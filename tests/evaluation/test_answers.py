"""Answer parsing for generation mode: letters, option text, yes / no / maybe, and what stays unparseable."""

import pytest

from finetune.evaluation.answers import parse_answer

OPTIONS = {"A": "Aspirin", "B": "Microcytic anaemia", "C": "Aspirin and clopidogrel", "D": "Basophilia"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("(C)", "C"),
        ("c", "C"),
        ("b.", "B"),
        ("Option D", "D"),
        ("The answer is (C)", "C"),
        ("Answer: (C)", "C"),
        ("Answer: C.", "C"),
        ("answer: (c)", "C"),
        ("the correct option is d.", "D"),
        ("The answer is B because iron deficiency causes it.", "B"),
        ("B. Microcytic anaemia is typical of iron deficiency", "B"),
        ("Ferritin is low, so iron is missing. The answer is B.", "B"),
        ("Ans. is 'a' in older texts, but the answer is B.", "B"),  # only answer statements count when present
        # option text only
        ("Microcytic anaemia", "B"),
        ("The answer is microcytic anaemia.", "B"),
        ("I would give aspirin and clopidogrel here.", "C"),  # not also "aspirin", which it contains
        ("aspirin", "A"),
        # unparseable
        ("The answer is B or C", None),
        ("B or C", None),
        ("B, C", None),
        ("The answer is (B). On reflection, the answer is (C).", None),
        ("The answer is E", None),  # no option E here
        ("The answer is a bit unclear", None),  # the article "a" is no answer
        ("A 45-year-old woman should have further tests first", None),
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_multiple_choice(text, expected):
    assert parse_answer(text, OPTIONS) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("maybe", "maybe"),
        ("Maybe.", "maybe"),
        ("YES", "yes"),
        ("no", "no"),
        ("The answer is no.", "no"),
        ("Answer: Maybe", "maybe"),
        ("There was no significant difference in one trial, but the answer is yes.", "yes"),
        ("Yes or no", None),
        ("The answer is yes. Wait, the answer is maybe.", None),
        ("The evidence is unclear", None),
        ("", None),
    ],
)
def test_yes_no_maybe(text, expected):
    assert parse_answer(text) == expected
