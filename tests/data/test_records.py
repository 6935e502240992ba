"""Record validation: `pytest tests/data/test_records.py`.

Each problem kind of ``parse_record`` is provoked by a hand-made record; the test checks the stable ``kind``, the
field named, and that the message names the record id and the field so a person can find and fix it.
"""

from __future__ import annotations

import pytest

from llava.data.records import Message, RecordError, parse_record


def _conv(*turns: tuple[str, object]) -> list[dict]:
    return [{"from": role, "value": value} for role, value in turns]


def _error(raw, index=None) -> RecordError:
    with pytest.raises(RecordError) as info:
        parse_record(raw, index)
    err = info.value
    assert repr(err.record_id) in str(err) and repr(err.field) in str(err)
    return err


GOOD = _conv(("human", "<image>\nWhat colour?"), ("gpt", "red"))


@pytest.mark.parametrize(
    ("raw", "kind", "field"),
    [
        ({"id": "r1", "image": "a.png"}, "missing_conversations", "conversations"),
        ({"id": "r1", "conversations": "hello"}, "bad_type", "conversations"),
        ({"id": "r1", "conversations": []}, "bad_type", "conversations"),
        ({"id": "r1", "conversations": ["hello"]}, "bad_type", "conversations[0]"),
        ({"id": "r1", "conversations": _conv(("human", "hi"), ("gpt", 3))}, "bad_type", "conversations[1].value"),
        ({"id": "r1", "image": 7, "conversations": GOOD}, "bad_type", "image"),
        ({"id": "r1", "images": ["a.png", ""], "conversations": GOOD}, "bad_type", "images"),
        ({"id": "r1", "image": "a.png", "images": ["a.png"], "conversations": GOOD}, "bad_type", "image"),
        ({"id": "r1", "conversations": _conv(("human", "hi"), ("robot", "yo"))}, "bad_role", "conversations[1].from"),
        (
            {"id": "r1", "conversations": _conv(("human", "hi"), ("human", "yo"))},
            "bad_role_order",
            "conversations[1].from",
        ),
        (
            {"id": "r1", "conversations": _conv(("gpt", "hi"), ("human", "yo"))},
            "bad_role_order",
            "conversations[0].from",
        ),
        (
            {"id": "r1", "conversations": _conv(("system", "be nice"), ("gpt", "yo"))},
            "bad_role_order",
            "conversations[1].from",
        ),
        ({"id": "r1", "conversations": _conv(("human", "hi"))}, "no_assistant_turn", "conversations"),
        (
            {"id": "r1", "conversations": _conv(("human", "hi"), ("gpt", "  \n"))},
            "empty_text",
            "conversations[1].value",
        ),
        (
            {"id": "r1", "image": "a.png", "conversations": _conv(("human", "hi"), ("gpt", "yo"))},
            "image_token_mismatch",
            "conversations",
        ),
        ({"id": "r1", "conversations": GOOD}, "image_token_mismatch", "conversations"),
        (
            {"id": "r1", "images": ["a.png"], "conversations": _conv(("human", "<image><image>hi"), ("gpt", "yo"))},
            "image_token_mismatch",
            "conversations",
        ),
    ],
)
def test_problem_kinds_name_record_and_field(raw, kind, field):
    err = _error(raw)
    assert (err.kind, err.record_id, err.field) == (kind, "r1", field)
    assert str(err).startswith(f"record 'r1', field '{field}': ")


def test_record_without_id_is_named_by_its_index():
    err = _error({"conversations": _conv(("human", "hi"))}, index=7)
    assert err.record_id == "#7" and "'#7'" in str(err)
    err = _error(["not", "a", "dict"], index=3)
    assert (err.kind, err.record_id, err.field) == ("bad_type", "#3", "<record>")


def test_image_count_mismatch_message_gives_both_counts():
    err = _error({"id": "x", "images": ["a.png", "b.png"], "conversations": GOOD})
    assert "1 <image> placeholder(s)" in str(err) and "2 image(s)" in str(err)


def test_valid_record_normalises_roles_and_keeps_extras():
    raw = {
        "id": 12,
        "images": ["a.png", "b.png"],
        "source": "web",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "Human", "value": "<image> and <image>: same?"},
            {"role": "assistant", "content": "no"},
        ],
    }
    record = parse_record(raw)
    assert record.id == "12"
    assert record.images == ["a.png", "b.png"]
    assert record.messages == [
        Message("system", "Be brief."),
        Message("user", "<image> and <image>: same?"),
        Message("assistant", "no"),
    ]
    assert record.extras == {"source": "web"}
    assert record.num_image_placeholders == 2
    assert parse_record({"id": "s", "image": "a.png", "conversations": GOOD}).images == ["a.png"]


def test_datasets_row_with_both_columns_uses_the_non_null_one():
    """A `datasets` row carries every column; `image: None` beside `images: [...]` is not 'both keys'."""
    raw = {"id": "a", "image": None, "images": ["x.png"],
           "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}
    assert parse_record(raw).images == ["x.png"]
    raw_both = {**raw, "image": "y.png"}
    with pytest.raises(RecordError) as err:
        parse_record(raw_both)
    assert err.value.kind == "bad_type"
