"""Synthetic "shapes" image-question dataset in LLaVA JSON format: the embedded default for the demo and tests.

Each image is a plain light background holding 1..3 identical shapes (same kind, same colour), grouped around one
of four spots: the middle of the left, right, top or bottom edge (the cells of a 3x3 grid that touch the centre of
an edge). Several shapes line up along that edge, so "left" is a column at the left, "top" a row at the top. Every
attribute is sampled uniformly from a small answer set, so a model that ignores the image scores at chance:

    colour   red | green | blue | yellow        shape  circle | square | triangle
    position left | right | top | bottom        count  1 | 2 | 3

Files written under ``out_dir`` by :func:`generate_shapes_dataset` (image paths are relative to ``out_dir``, which
is the ``--image_folder``):

    images/*.png            one PNG per record (caption, qa and held-out images come from different seeds)
    stage1_captions.json    "<image>\\nDescribe the image." -> "two red circles on the left"
    stage2_qa.json          multi-turn Q&A about one image (``<image>`` in the first human turn only), plus ~5%
                            text-only records (arithmetic, chit-chat) with no "image" key
    heldout_qa.json         one question per record, with a top-level "question_type" and the gold answer as the
                            gpt turn; question types and answers are balanced

Run:  python playground/make_demo_data.py --out playground/data/shapes
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (235, 200, 20),
}
BACKGROUND: tuple[int, int, int] = (245, 245, 245)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
COUNTS: tuple[str, ...] = ("1", "2", "3")
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "position", "count")
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": POSITIONS,
    "count": COUNTS,
}
QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour are the shapes?", "Which colour do you see?", "What is the colour of the shapes?"),
    "shape": ("What kind of shape is shown?", "Which shape do you see?", "What shape are the objects?"),
    "position": ("Where are the shapes?", "Where in the image are the shapes?", "On which side are the shapes?"),
    "count": ("How many shapes are there?", "How many objects do you see?", "Count the shapes."),
}
CAPTION_PROMPTS: tuple[str, ...] = ("Describe the image.", "What is in this picture?", "Give a short description.")
ANSWER_HINT = "Answer with one word."

_COUNT_WORDS = {"1": "one", "2": "two", "3": "three"}
_POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_CHITCHAT: tuple[tuple[str, str], ...] = (
    ("Say hello.", "hello"),
    ("Reply with the word yes.", "yes"),
    ("Reply with the word no.", "no"),
    ("What is the opposite of up?", "down"),
    ("What is the opposite of day?", "night"),
)


@dataclass(frozen=True)
class ShapeScene:
    """The four attributes of one image; together they are its full description."""

    colour: str
    shape: str
    position: str
    count: str

    def answer(self, question_type: str) -> str:
        """The gold single-word answer to a question of ``question_type``."""
        return getattr(self, question_type)

    def caption(self) -> str:
        """A short caption such as ``"two red circles on the left"``."""
        n = int(self.count)
        noun = self.shape + ("s" if n > 1 else "")
        return f"{_COUNT_WORDS[self.count]} {self.colour} {noun} {_POSITION_PHRASES[self.position]}"


def normalize_answer(text: str) -> str:
    """Normalise an answer for exact match: lowercase, drop punctuation, collapse and strip whitespace."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(text.split())


def random_scene(rng: random.Random) -> ShapeScene:
    """Sample each attribute uniformly and independently."""
    return ShapeScene(
        colour=rng.choice(ANSWERS["colour"]),
        shape=rng.choice(SHAPES),
        position=rng.choice(POSITIONS),
        count=rng.choice(COUNTS),
    )


def shape_centres(position: str, count: int, image_size: int, rng: random.Random) -> list[tuple[float, float]]:
    """Centres of ``count`` shapes lined up along the edge named by ``position`` (pixels, x right, y down).

    The group's midpoint is the centre of the edge cell of a 3x3 grid, jittered by a few pixels (never out of the
    cell's band, never into the centre cell); several shapes are spread along the edge, ``0.31 * image_size``
    apart, so they never touch.
    """
    s = image_size
    edge, mid, step = s / 6, s / 2, 0.31 * s
    along = [mid + (i - (count - 1) / 2) * step for i in range(count)]
    across = {"left": edge, "right": s - edge, "top": edge, "bottom": s - edge}[position]
    across += rng.uniform(-0.03 * s, 0.03 * s)
    shift = rng.uniform(-0.06 * s, 0.06 * s)
    if position in ("left", "right"):
        return [(across, a + shift) for a in along]
    return [(a + shift, across) for a in along]


def draw_scene(scene: ShapeScene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw ``scene`` on a plain background (no anti-aliasing: every pixel is background or the exact colour)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    colour = COLOURS[scene.colour]
    half = rng.uniform(0.09, 0.12) * image_size  # half the shape's width: at most 0.24 * size, below the 0.31 step
    for cx, cy in shape_centres(scene.position, int(scene.count), image_size, rng):
        box = [round(cx - half), round(cy - half), round(cx + half), round(cy + half)]
        if scene.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif scene.shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)
    return image


def _question(rng: random.Random, question_type: str) -> str:
    question = rng.choice(QUESTIONS[question_type])
    return f"{question} {ANSWER_HINT}" if rng.random() < 0.5 else question


def _pixel_digest(image: Image.Image) -> bytes:
    return hashlib.blake2b(image.tobytes(), digest_size=16).digest()


def _save(image: Image.Image, out_dir: Path, name: str, seen: set[bytes]) -> str:
    seen.add(_pixel_digest(image))
    rel = f"images/{name}.png"
    image.save(out_dir / rel, compress_level=1)
    return rel


def _caption_records(out_dir: Path, n: int, image_size: int, seed: int, seen: set[bytes]) -> list[dict]:
    rng = random.Random(f"shapes-caption-{seed}")
    records = []
    for i in range(n):
        scene = random_scene(rng)
        image = _save(draw_scene(scene, image_size, rng), out_dir, f"caption_{i:06d}", seen)
        prompt = rng.choice(CAPTION_PROMPTS)
        conversations = [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": scene.caption()}]
        records.append({"id": f"caption_{i:06d}", "image": image, "conversations": conversations})
    return records


def _text_only_record(rng: random.Random, record_id: str) -> dict:
    conversations = []
    for _ in range(rng.randint(1, 2)):
        if rng.random() < 0.6:
            a, b = rng.randint(0, 4), rng.randint(0, 4)
            question, answer = f"What is {a} plus {b}?", str(a + b)
        else:
            question, answer = rng.choice(_CHITCHAT)
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": record_id, "conversations": conversations}


def _qa_records(
    out_dir: Path, n: int, image_size: int, seed: int, text_fraction: float, seen: set[bytes]
) -> list[dict]:
    rng = random.Random(f"shapes-qa-{seed}")
    text_only = set(rng.sample(range(n), round(n * text_fraction)))
    records = []
    for i in range(n):
        record_id = f"qa_{i:06d}"
        if i in text_only:
            records.append(_text_only_record(rng, record_id))
            continue
        scene = random_scene(rng)
        image = _save(draw_scene(scene, image_size, rng), out_dir, record_id, seen)
        types = rng.sample(QUESTION_TYPES, rng.randint(2, len(QUESTION_TYPES)))
        conversations = []
        for turn, question_type in enumerate(types):
            question = _question(rng, question_type)
            conversations.append({"from": "human", "value": f"<image>\n{question}" if turn == 0 else question})
            conversations.append({"from": "gpt", "value": scene.answer(question_type)})
        records.append({"id": record_id, "image": image, "conversations": conversations})
    return records


def _balanced(rng: random.Random, values: tuple[str, ...], n: int) -> list[str]:
    """``n`` values, each of ``values`` appearing ``n // len(values)`` or one more times, in random order."""
    out = list(values) * (n // len(values)) + rng.sample(values, n % len(values))
    rng.shuffle(out)
    return out


def _heldout_records(out_dir: Path, n: int, image_size: int, seed: int, train_digests: set[bytes]) -> list[dict]:
    """Single-question records; an image that happens to equal a training image pixel for pixel is redrawn."""
    rng = random.Random(f"shapes-heldout-{seed}")
    types = _balanced(rng, QUESTION_TYPES, n)
    gold = {t: iter(_balanced(rng, ANSWERS[t], types.count(t))) for t in QUESTION_TYPES}
    records = []
    for i, question_type in enumerate(types):
        scene = random_scene(rng)
        scene = ShapeScene(**{**scene.__dict__, question_type: next(gold[question_type])})
        record_id = f"heldout_{i:06d}"
        drawn = draw_scene(scene, image_size, rng)
        for _ in range(1000):
            if _pixel_digest(drawn) not in train_digests:
                break
            drawn = draw_scene(scene, image_size, rng)
        else:
            raise RuntimeError(f"cannot draw a held-out image unlike the training ones for {scene}")
        image = _save(drawn, out_dir, record_id, set())
        conversations = [
            {"from": "human", "value": f"<image>\n{_question(rng, question_type)}"},
            {"from": "gpt", "value": scene.answer(question_type)},
        ]
        records.append(
            {"id": record_id, "image": image, "conversations": conversations, "question_type": question_type}
        )
    return records


def generate_shapes_dataset(
    out_dir: str | Path,
    *,
    n_caption: int = 1000,
    n_qa: int = 2000,
    n_heldout: int = 400,
    image_size: int = 64,
    seed: int = 0,
    text_fraction: float = 0.05,
) -> dict[str, Path]:
    """Draw the dataset under ``out_dir`` and return the paths written.

    Returns ``{"image_folder", "stage1_captions", "stage2_qa", "heldout_qa"}``; ``image_folder`` is ``out_dir`` (the
    records' "image" paths are relative to it). ``n_qa`` counts all stage-2 records, of which
    ``round(n_qa * text_fraction)`` are text-only. Held-out images come from their own random stream and never
    equal a training image pixel for pixel. The same ``seed`` gives byte-identical files.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    train_digests: set[bytes] = set()
    splits = {
        "stage1_captions": _caption_records(out_dir, n_caption, image_size, seed, train_digests),
        "stage2_qa": _qa_records(out_dir, n_qa, image_size, seed, text_fraction, train_digests),
    }
    splits["heldout_qa"] = _heldout_records(out_dir, n_heldout, image_size, seed, train_digests)
    paths: dict[str, Path] = {"image_folder": out_dir}
    for name, records in splits.items():
        paths[name] = out_dir / f"{name}.json"
        paths[name].write_text(json.dumps(records, indent=1) + "\n")
    return paths
