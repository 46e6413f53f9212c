from __future__ import annotations

import pytest

from ccoe_common.engine.detokenizer import IncrementalDetokenizer
from ccoe_common.model.synthetic import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def stream(tok, text: str, stop=()) -> tuple[list[str], IncrementalDetokenizer]:
    d = IncrementalDetokenizer(tok, stop)
    deltas = []
    for t in tok(text, add_special_tokens=False).input_ids:
        deltas.append(d.add(t))
        if d.stopped:
            break
    deltas.append(d.finish())
    return deltas, d


def test_deltas_concatenate_to_the_text(tok):
    text = "SELECT name FROM users WHERE age > 30;"
    deltas, d = stream(tok, text)
    assert "".join(deltas) == text == d.text


def test_multibyte_characters_are_never_split(tok):
    text = "café → 東京 ✓"
    deltas, _ = stream(tok, text)
    assert "".join(deltas) == text
    assert all("\ufffd" not in x for x in deltas)


def test_stop_string_is_cut_and_never_streamed(tok):
    deltas, d = stream(tok, "Compute 12 + 7 and 144 / 12.", stop=("144",))
    # Every delta, as streamed, stays clear of the stop string's first characters.
    assert d.stopped and "".join(deltas) == "Compute 12 + 7 and "


def test_stop_string_spanning_tokens(tok):
    deltas, d = stream(tok, "the patient presents with fever", stop=("nts wi",))
    assert d.stopped and "".join(deltas) == "the patient prese"


def test_long_output_matches_one_full_decode(tok):
    text = "Compute 12 + 7 and 144 / 12. SELECT name FROM users WHERE age > 30; café 東京 " * 5
    deltas, _ = stream(tok, text)
    assert "".join(deltas) == tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_an_unfinished_character_is_flushed_at_the_end(tok):
    ids = tok("東", add_special_tokens=False).input_ids
    assert len(ids) > 1  # one character spread over several byte tokens
    d = IncrementalDetokenizer(tok)
    assert d.add(ids[0]) == ""  # held back: not a whole character yet
    assert d.finish() == tok.decode(ids[:1])  # released as is when generation ends there
