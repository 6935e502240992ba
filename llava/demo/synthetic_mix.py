"""A synthetic LLaVA-665K-like instruction mix and the "small" benchmark model, for throughput measurements.

    python -m llava.demo.synthetic_mix --workdir /tmp/bench_mix --n 2000      # data + models under workdir

The words are nonsense; what matches the real mix is the *shape* of each batch: which samples carry an image, how
many turns they have and how long each reply is. The proportions follow the LLaVA-1.5 data table (665K = LLaVA-
Instruct 158K, ShareGPT 40K text-only, VQAv2 83K, GQA 72K, OKVQA 9K, OCR-VQA 80K, A-OKVQA 66K, TextCaps 22K,
RefCOCO 48K, VG 86K), with the text-only share raised to 10% as the benchmark brief asks:

=============  ======  ==========================  =======================  ===========================
kind           share   turns (human+gpt pairs)     question words           answer words
=============  ======  ==========================  =======================  ===========================
text_only      10%     1 + Geometric(p=0.5), <=8   LogNormal(ln 25, 1.0)    LogNormal(ln 120, 0.9)
short_vqa      45%     1 + Geometric(p=0.25), <=20 LogNormal(ln 9, 0.4)     LogNormal(ln 2, 0.6)
conversation   23%     1 + Geometric(p=0.45), <=10 LogNormal(ln 12, 0.5)    LogNormal(ln 60, 0.8)
grounding      22%     1 + Geometric(p=0.35), <=12 LogNormal(ln 8, 0.4)     LogNormal(ln 8, 0.5)
=============  ======  ==========================  =======================  ===========================

(Geometric counts extra turns, so its mean is (1-p)/p.) Why this resembles the real mix: LLaVA-1.5 merges the
many questions asked about one VQA image into one multi-turn conversation with one- or two-word answers, so the
most common sample is an image plus a short dialogue (a few hundred tokens, most of them image tokens); the
LLaVA-Instruct conversations, detailed descriptions and reasoning answers are paragraphs; region/caption data sit
in between; and the ShareGPT text-only conversations are the long tail, up to the context limit. Log-normal reply
lengths and geometric turn counts give that right-skewed, long-tailed token-length histogram, which is what
padding cost depends on: a batch pads to its longest sample.

Images are a few ``--distinct`` COCO-sized JPEGs (640x480), referenced round-robin, so loading a sample decodes
and resizes a real JPEG as training on COCO does. The benchmark model (:data:`SMALL_LLM`, :data:`SMALL_VISION`): a
Llama of ~22M parameters (512 wide, 6 layers, GQA 8/4 heads, vocabulary 4096) and a CLIP vision tower at
224 px / patch 14 -> 256 patch tokens per image (384 wide, 6 layers), with the tokenizer trained on the mix.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

from llava.demo.tiny_models import llava_json_texts, write_tiny_llm, write_tiny_vision_tower

MIX = {  # kind: (share, p of one more turn's geometric, max turns, (q median, q sigma), (a median, a sigma))
    "text_only": (0.10, 0.5, 8, (25, 1.0), (120, 0.9)),
    "short_vqa": (0.45, 0.25, 20, (9, 0.4), (2, 0.6)),
    "conversation": (0.23, 0.45, 10, (12, 0.5), (60, 0.8)),
    "grounding": (0.22, 0.35, 12, (8, 0.4), (8, 0.5)),
}
SMALL_LLM = dict(hidden_size=512, num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=1376,
                 vocab_size=4096, max_position_embeddings=2048)
SMALL_VISION = dict(image_size=224, patch_size=14, hidden_size=384, num_layers=6, num_heads=6)
# the configuration of the throughput figures in the issue that asked for a TRL peer: the same LLM, CLIP 4L/192
ISSUE_VISION = dict(image_size=224, patch_size=14, hidden_size=192, num_layers=4, num_heads=3)
TINY_LLM = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=1024,
                max_position_embeddings=1024)
TINY_VISION = dict(image_size=56, patch_size=14, hidden_size=32, num_layers=2, num_heads=2)


def make_words(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct pronounceable nonsense words (the tokenizer learns most of them as one token)."""
    consonants, vowels = "bcdfghklmnprstvz", "aeiou"
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def _lognormal_int(rng: random.Random, median: float, sigma: float) -> int:
    return max(1, round(rng.lognormvariate(math.log(median), sigma)))


def _geometric(rng: random.Random, p: float, cap: int) -> int:
    k = 0
    while k < cap - 1 and rng.random() > p:
        k += 1
    return 1 + k


def make_record(i: int, kind: str, rng: random.Random, words: list[str], weights: list[float], n_images: int) -> dict:
    _, p_turn, max_turns, (q_med, q_sig), (a_med, a_sig) = MIX[kind]

    def text(median: float, sigma: float) -> str:
        return " ".join(rng.choices(words, weights=weights, k=_lognormal_int(rng, median, sigma)))

    conversations = []
    for turn in range(_geometric(rng, p_turn, max_turns)):
        question = text(q_med, q_sig) + "?"
        if turn == 0 and kind != "text_only":
            question = "<image>\n" + question
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": text(a_med, a_sig) + "."}]
    record = {"id": f"{kind}_{i:06d}", "conversations": conversations}
    if kind != "text_only":
        record["image"] = f"img_{i % n_images:03d}.jpg"
    return record


def write_images(folder: Path, n: int, rng: random.Random, size: tuple[int, int] = (640, 480)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        image = Image.linear_gradient("L").resize(size).convert("RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = rng.randrange(size[0]), rng.randrange(size[1])
            r = rng.randint(10, 120)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(folder / f"img_{k:03d}.jpg", quality=90)


def generate_mix(workdir: str | Path, n: int = 2000, *, distinct_images: int = 32, seed: int = 0) -> dict[str, Path]:
    """Write ``workdir/mix.jsonl`` (``n`` records in shuffled kind order) and ``workdir/images/``."""
    workdir = Path(workdir)
    rng = random.Random(seed)
    words = make_words(3000, rng)
    weights = [1.0 / (r + 1) for r in range(len(words))]  # Zipf-like word frequencies
    kinds = rng.choices(list(MIX), weights=[v[0] for v in MIX.values()], k=n)
    records = [make_record(i, kind, rng, words, weights, distinct_images) for i, kind in enumerate(kinds)]
    workdir.mkdir(parents=True, exist_ok=True)
    data_path = workdir / "mix.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    write_images(workdir / "images", distinct_images, rng)
    return {"data_path": data_path, "image_folder": workdir / "images"}


def write_bench_models(workdir: str | Path, data_path: str | Path, *, size: str = "small", seed: int = 0) -> dict:
    """The benchmark LLM (tokenizer trained on the mix) and vision tower under ``workdir/models/``.

    ``size="small"`` is the benchmark model above; ``"issue"`` the same LLM with a CLIP of 4 layers, 192 wide
(:data:`ISSUE_VISION`); ``"tiny"`` the same shape of run in seconds (tests).
    """

    llm, vision = {"small": (SMALL_LLM, SMALL_VISION), "issue": (SMALL_LLM, ISSUE_VISION),
                   "tiny": (TINY_LLM, TINY_VISION)}[size]
    models = Path(workdir) / "models"
    vision_dir = write_tiny_vision_tower(models / f"{size}-clip-vision", kind="clip", seed=seed, **vision)
    texts = llava_json_texts([data_path])[:20000]
    llm_dir = write_tiny_llm(models / f"{size}-llama", texts=texts, seed=seed, **llm)
    return {"vision_tower": vision_dir, "llm": llm_dir}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", choices=("small", "issue", "tiny"), default="small")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = generate_mix(args.workdir, args.n, seed=args.seed)
    paths.update(write_bench_models(args.workdir, paths["data_path"], size=args.size, seed=args.seed))
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
