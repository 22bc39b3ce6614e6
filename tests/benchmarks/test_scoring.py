import pytest

from benchmarks.scbench.scoring import SCORERS, all_of_set, answer_text, first_number, score, substring


@pytest.mark.parametrize("pred,label,expected", [
    ("The value is 3f0c-11.", "3f0c-11", 1.0),
    ("3f0c-11", "3f0c-11", 1.0),
    ("3F0C-11", "3f0c-11", 0.0),  # exact substring (case matters for random strings)
    ("3f0c-1", "3f0c-11", 0.0),
    ("", "abc", 0.0),
    ("The pass key is 12345.", "12345", 1.0),
    (None, "12345", 0.0),
])
def test_substring(pred, label, expected):
    assert substring(pred, label) == expected


@pytest.mark.parametrize("pred,ref,expected", [
    ("ABCDE, FGHIJ, KLMNO", ["ABCDE", "FGHIJ", "KLMNO"], 1.0),
    ("abcde fghij", ["ABCDE", "FGHIJ", "KLMNO", "PQRST"], 0.5),
    ("nothing here", ["ABCDE", "FGHIJ"], 0.0),
    ("ABCDE", "ABCDE", 1.0),
    ("ABCDE", [], 0.0),
])
def test_all_of_set(pred, ref, expected):
    assert all_of_set(pred, ref) == pytest.approx(expected)


@pytest.mark.parametrize("pred,label,expected", [
    ("99871", 99871, 1.0),
    ("The largest number is 99871.", 99871, 1.0),
    ("99,871 is the largest", 99871, 1.0),
    ("12 then 99871", 99871, 0.0),  # only the first number counts
    ("-5", -5, 1.0),
    ("no number", 3, 0.0),
    ("3.0", 3, 1.0),
    ("31", 3, 0.0),
])
def test_first_number(pred, label, expected):
    assert first_number(pred, label) == expected


def test_registry_and_dispatch():
    assert set(SCORERS) == {"substring", "all_of_set", "first_number"}
    assert score("substring", "xx abc", "abc") == 1.0
    with pytest.raises(KeyError):
        score("nope", "a", "a")


def test_answer_text():
    assert answer_text(["A", "B"]) == "A, B"
    assert answer_text(42) == "42"
