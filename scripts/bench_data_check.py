"""Benchmark ``llava data check``: N synthetic records with JPEG images on disk, records/s with and without decoding.

    PYTHONPATH=. python scripts/bench_data_check.py --n 100000 --workdir /tmp/bench_check [--image_size 336]

Writes ``--distinct`` real JPEGs (shapes on a gradient, ``--image_size`` square) and hard-links them to N files (one
per record, as a real dataset has), a JSON with one single-turn Q&A per record, and the tiny demo tokenizer and
vision tower (config only is read by the checker). Then times :func:`check_dataset` three ways: full (parse,
tokenize, decode every image), ``decode=False`` (parse, tokenize, stat/confine each path) and image decoding alone
(the same thread pool over ``open_image_rgb``); the share of decoding in the full run is what this measures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw


def write_images(folder: Path, n: int, distinct: int, size: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    sources = []
    for k in range(distinct):
        img = Image.linear_gradient("L").resize((size, size)).convert("RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(5):
            x, y = rng.randrange(size), rng.randrange(size)
            draw.ellipse((x, y, x + size // 4, y + size // 4), fill=tuple(rng.randrange(256) for _ in range(3)))
        path = folder / f"src_{k}.jpg"
        img.save(path, quality=90)
        sources.append(path)
    names = []
    for i in range(n):
        name = f"{i // 1000:03d}/{i:07d}.jpg"
        target = folder / name
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            os.link(sources[i % distinct], target)
        names.append(name)
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--workdir", default="/tmp/bench_data_check")
    p.add_argument("--image_size", type=int, default=336)
    p.add_argument("--distinct", type=int, default=500)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    args = p.parse_args()

    from llava.data.images import open_image_rgb
    from llava.data.templates import get_template
    from llava.data_check import TokenSetup, check_dataset

    work = Path(args.workdir)
    t0 = time.perf_counter()
    names = write_images(work / "images", args.n, args.distinct, args.image_size)
    records = [{"id": str(i), "image": name, "conversations": [
        {"from": "human", "value": f"<image>\nWhat colour is shape number {i % 7}?"},
        {"from": "gpt", "value": f"It is a circle, the {i % 5}th from the left, coloured by the gradient."}]}
        for i, name in enumerate(names)]
    data_path = work / "data.json"
    data_path.write_text(json.dumps(records))
    setup = _tiny_setup(work, TokenSetup, get_template)
    print(f"generated {args.n} records in {time.perf_counter() - t0:.1f}s; workers={args.workers}")

    folder = work / "images"

    def decode_only():
        with ThreadPoolExecutor(args.workers) as pool:
            for _ in pool.map(lambda n: open_image_rgb(folder / n)[0].size, names):  # keep no pixels alive
                pass

    runs = {"full (decode)": lambda: check_dataset(data_path, folder, setup, workers=args.workers, progress=False),
            "no decode": lambda: check_dataset(data_path, folder, setup, decode=False, workers=args.workers,
                                               progress=False),
            "decode only": decode_only}
    cpu = {}
    for label, run in runs.items():
        t, c = time.perf_counter(), _cpu_seconds()
        run()
        wall, cpu[label] = time.perf_counter() - t, _cpu_seconds() - c
        print(f"{label:>14}: {wall:7.2f}s wall {cpu[label]:7.2f}s CPU  {args.n / wall:7.0f} records/s")
    print(f"image decoding's share of the full check's CPU time: "
          f"{(cpu['full (decode)'] - cpu['no decode']) / cpu['full (decode)']:.0%} "
          f"(decode-only CPU / full CPU: {cpu['decode only'] / cpu['full (decode)']:.0%})")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _tiny_setup(work: Path, token_setup_cls, get_template):
    from transformers import AutoTokenizer

    from llava.constants import DEFAULT_IMAGE_TOKEN
    from llava.demo.shapes import generate_shapes_dataset
    from llava.demo.tiny_models import write_demo_models
    from llava.model.builder import add_multimodal_tokens

    shapes = generate_shapes_dataset(work / "shapes", n_caption=64, n_qa=64, n_heldout=8)
    models = write_demo_models(work, shapes)
    tokenizer = AutoTokenizer.from_pretrained(models["llm"])
    add_multimodal_tokens(tokenizer, False)
    return token_setup_cls(tokenizer, get_template("vicuna_v1"), tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN),
                           576, 2048)  # 576: a 336-px CLIP-L/14's image tokens, so lengths look like LLaVA-1.5's


if __name__ == "__main__":
    main()
