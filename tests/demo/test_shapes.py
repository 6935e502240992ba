"""Tests for the synthetic shapes dataset: every claim a record makes is checked against the pixels.

Run:  .venv/bin/pytest tests/demo/test_shapes.py -q
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava.demo.shapes import ANSWERS, QUESTION_TYPES, QUESTIONS, generate_shapes_dataset, normalize_answer

SIZE = 64
# Nominal colours, independent of the generator's palette: the drawn colour must be nearest to the stated one.
NOMINAL_RGB = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
WORD_COUNTS = {"one": "1", "two": "2", "three": "3"}
CAPTION_RE = re.compile(r"^(one|two|three) (red|green|blue|yellow) (circle|square|triangle)s? (?:on|at) the (\w+)$")
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_caption=200, n_qa=300, n_heldout=200)


def load(paths: dict[str, Path], split: str) -> list[dict]:
    return json.loads(paths[split].read_text())


def pixels(paths: dict[str, Path], record: dict) -> np.ndarray:
    return np.asarray(Image.open(paths["image_folder"] / record["image"]).convert("RGB")).astype(int)


def cell(position: str) -> tuple[slice, slice]:
    """(rows, cols) of the edge cell of a 3x3 grid named by ``position``."""
    third = SIZE // 3
    lo, mid, hi = slice(0, third), slice(third + 1, 2 * third), slice(2 * third + 1, SIZE)
    return {"left": (mid, lo), "right": (mid, hi), "top": (lo, mid), "bottom": (hi, mid)}[position]


def blobs(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean mask, by flood fill."""
    seen = np.zeros_like(mask)
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, blob = [start], []
        while stack:
            y, x = stack.pop()
            blob.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        found.append(blob)
    return found


def shape_of(blob: list[tuple[int, int]]) -> str:
    """Square fills its bounding box, a circle about pi/4 of it, a triangle about half."""
    ys, xs = zip(*blob)
    fill = len(blob) / ((max(ys) - min(ys) + 1) * (max(xs) - min(xs) + 1))
    return "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"


def observed(image: np.ndarray) -> dict[str, str]:
    """The four attributes read off the pixels alone."""
    foreground = (image != image[0, 0]).any(-1)  # the corner is always background
    mean = image[foreground].mean(0)
    colour = min(NOMINAL_RGB, key=lambda c: np.linalg.norm(mean - NOMINAL_RGB[c]))
    found = blobs(foreground)
    shapes = {shape_of(b) for b in found}
    assert len(shapes) == 1, f"all shapes should be the same kind, saw {shapes}"
    in_cell = [p for p in ("left", "right", "top", "bottom") if foreground[cell(p)].any()]
    # the group sits at one edge: its cell is occupied, the opposite edge and the centre are empty
    position = [p for p in in_cell if not foreground[cell(OPPOSITE[p])].any()]
    assert not foreground[SIZE // 3 + 1 : 2 * SIZE // 3, SIZE // 3 + 1 : 2 * SIZE // 3].any(), "centre not empty"
    assert len(position) == 1, f"ambiguous position, occupied cells {in_cell}"
    return {"colour": colour, "shape": shapes.pop(), "position": position[0], "count": str(len(found))}


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
    again = generate_shapes_dataset(tmp_path / "a", n_caption=200, n_qa=300, n_heldout=200)
    for split in ("stage1_captions", "stage2_qa", "heldout_qa"):
        assert again[split].read_bytes() == dataset[split].read_bytes()
    names = sorted(p.name for p in (dataset["image_folder"] / "images").iterdir())
    assert names == sorted(p.name for p in (again["image_folder"] / "images").iterdir())
    for name in names[::10]:
        assert (again["image_folder"] / "images" / name).read_bytes() == (
            dataset["image_folder"] / "images" / name
        ).read_bytes()
    other = generate_shapes_dataset(tmp_path / "b", n_caption=200, n_qa=300, n_heldout=200, seed=1)
    for split in ("stage1_captions", "stage2_qa", "heldout_qa"):
        assert other[split].read_bytes() != dataset[split].read_bytes()


def test_heldout_images_differ_from_training_images(dataset):
    train = {
        pixels(dataset, r).tobytes() for s in ("stage1_captions", "stage2_qa") for r in load(dataset, s) if "image" in r
    }
    heldout = [pixels(dataset, r).tobytes() for r in load(dataset, "heldout_qa")]
    assert len(train) > 400
    assert not train.intersection(heldout)


def test_caption_states_what_the_pixels_show(dataset):
    for record in load(dataset, "stage1_captions"):
        caption = record["conversations"][1]["value"]
        match = CAPTION_RE.match(caption)
        assert match, caption
        words, colour, shape, position = match.groups()
        stated = {"colour": colour, "shape": shape, "position": position, "count": WORD_COUNTS[words]}
        assert observed(pixels(dataset, record)) == stated, (record["id"], caption)


def test_qa_and_heldout_answers_match_the_pixels(dataset):
    records = load(dataset, "stage2_qa") + load(dataset, "heldout_qa")
    question_types = {q: t for t in QUESTION_TYPES for q in QUESTIONS[t]}
    checked = Counter()
    for record in records:
        if "image" not in record:
            continue
        seen = observed(pixels(dataset, record))
        turns = record["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            question = human["value"].removeprefix("<image>\n")
            question_type = question_types[question.removesuffix(" Answer with one word.")]
            if "question_type" in record:
                assert record["question_type"] == question_type
            assert gpt["value"] == seen[question_type], (record["id"], question, gpt["value"], seen)
            checked[question_type] += 1
    assert min(checked.values()) > 100


def test_answers_uniform_per_type_and_questions_do_not_leak(dataset):
    answer_words = {a for answers in ANSWERS.values() for a in answers}
    assert ANSWERS == {
        "colour": ("red", "green", "blue", "yellow"),
        "shape": ("circle", "square", "triangle"),
        "position": ("left", "right", "top", "bottom"),
        "count": ("1", "2", "3"),
    }
    for split in ("stage2_qa", "heldout_qa"):
        by_type: dict[str, Counter] = {t: Counter() for t in QUESTION_TYPES}
        questions = set()
        for record in load(dataset, split):
            if "image" not in record:
                continue
            turns = record["conversations"]
            for human, gpt in zip(turns[::2], turns[1::2]):
                question = human["value"].removeprefix("<image>\n")
                questions.add(question)
                assert not set(re.findall(r"\w+", question.lower())) & answer_words, question
                question_type = next(t for t in QUESTION_TYPES if gpt["value"] in ANSWERS[t])
                by_type[question_type][gpt["value"]] += 1
        assert len(questions) <= 24, "questions come from a small set of phrasings"
        for question_type, counts in by_type.items():
            expected = sum(counts.values()) / len(ANSWERS[question_type])
            assert set(counts) == set(ANSWERS[question_type])
            for answer, n in counts.items():
                assert 0.6 * expected <= n <= 1.4 * expected, (split, question_type, answer, n, expected)
    heldout_types = Counter(r["question_type"] for r in load(dataset, "heldout_qa"))
    assert set(heldout_types.values()) == {50}


def test_record_format_and_image_placeholders(dataset):
    text_only = 0
    for split in ("stage1_captions", "stage2_qa", "heldout_qa"):
        ids = set()
        for record in load(dataset, split):
            assert isinstance(record["id"], str) and record["id"] not in ids
            ids.add(record["id"])
            turns = record["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and turns
            placeholders = [t["value"].count("<image>") for t in turns]
            if "image" in record:
                assert placeholders == [1] + [0] * (len(turns) - 1)
                assert turns[0]["value"].startswith("<image>\n")
                assert (dataset["image_folder"] / record["image"]).is_file()
                assert not Path(record["image"]).is_absolute()
            else:
                assert sum(placeholders) == 0
                text_only += 1
                assert split == "stage2_qa"
            for gpt in turns[1::2]:
                if split != "stage1_captions":
                    assert re.fullmatch(r"[a-z0-9]+", gpt["value"]), gpt["value"]
    assert text_only == 15  # 5% of 300


def test_text_only_arithmetic_is_correct(dataset):
    for record in load(dataset, "stage2_qa"):
        for human, gpt in zip(record["conversations"][::2], record["conversations"][1::2]):
            match = re.fullmatch(r"What is (\d) plus (\d)\?", human["value"])
            if match:
                assert int(gpt["value"]) == int(match[1]) + int(match[2])


@pytest.mark.parametrize(
    "raw, expected",
    [("red", "red"), (" Red. ", "red"), ("2\n", "2"), ("Left!", "left"), ("  A  Circle ", "a circle"), ("", "")],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected
