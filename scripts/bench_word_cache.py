"""CPU cost per rendered text of ``llava/data/word_cache.py`` against the Rust tokenizer's batched calls.

    PYTHONPATH=. python scripts/bench_word_cache.py --workdir /tmp/wcache [--n 400] [--families gpt2,qwen2,llama3]

The benchmark mix (``llava.demo.synthetic_mix``, ``--n`` records) is rendered by three templates (vicuna_v1,
llama3, chatml; the texts the index tokenizes, ``supervised_text``), and tokenized by a BPE of each ``--families``
pipeline (``train_tiny_tokenizer(family=...)``, trained on the mix; ``<image>`` added as the index adds it):

- ``ids``: ``WordCacheEncoder.ids`` over all the texts, first with an empty cache (``cold``; the mix repeats words,
  so most are hits after the first texts) and then again (``warm``, best of 3), against ``encode_batch_fast`` in
  batches of 256 (``add_special_tokens=False``, best of 3);
- ``ids_offsets``: the same with offsets (``ids_offsets``, offsets read) against ``encode_batch``;
- ``unique``: 512 texts of 150 new random words each, every word a miss, ``ids`` against ``encode_batch_fast``.

Times are ``time.process_time`` (this process's CPU), in microseconds per text; one JSON line per family, then the
load average. The machine may be shared, so read CPU time and quote the load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from llava.data.records import parse_record
from llava.data.templates import get_template
from llava.data.tokenize import prepare_messages, supervised_text
from llava.data.word_cache import WordCacheEncoder
from llava.demo.synthetic_mix import generate_mix
from llava.demo.tiny_models import llava_json_texts, train_tiny_tokenizer
from llava.model.builder import add_multimodal_tokens


def rendered(raws: list, tok, template) -> list[str]:
    out = []
    for i, raw in enumerate(raws):
        segments = template.render_with_tokenizer(prepare_messages(parse_record(raw, i).messages, template, False), tok)
        out.append(supervised_text([s for s in segments if not s.special])[0])
    return out


def us_per_text(run, texts: list[str], reps: int = 1) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.process_time()
        run(texts)
        best = min(best, time.process_time() - start)
    return round(1e6 * best / len(texts), 1)


def measure(family: str, raws: list, corpus: list[str]) -> dict:
    tok = train_tiny_tokenizer(corpus, family=family)
    add_multimodal_tokens(tok, False)
    backend = tok._tokenizer
    texts = [t for name in ("vicuna_v1", "llama3", "chatml") for t in rendered(raws, tok, get_template(name))]

    def batched(call):
        return lambda ts: [call(ts[b : b + 256], add_special_tokens=False) for b in range(0, len(ts), 256)]

    out = {"family": family, "texts": len(texts), "chars_per_text": round(sum(map(len, texts)) / len(texts))}
    encoder = WordCacheEncoder.for_tokenizer(tok)
    assert encoder is not None, f"{family}: the word cache does not take this tokenizer"
    ids = lambda ts: [encoder.ids(t) for t in ts]  # noqa: E731
    out["ids"] = {"cold": us_per_text(ids, texts), "warm": us_per_text(ids, texts, 3),
                  "encode_batch_fast": us_per_text(batched(backend.encode_batch_fast), texts, 3)}
    encoder = WordCacheEncoder.for_tokenizer(tok)
    offsets = lambda ts: [(i, list(o)) for i, o in map(encoder.ids_offsets, ts)]  # noqa: E731
    out["ids_offsets"] = {"cold": us_per_text(offsets, texts), "warm": us_per_text(offsets, texts, 3),
                          "encode_batch": us_per_text(batched(backend.encode_batch), texts, 3)}
    rng = random.Random(1)
    unique = [" ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 12)))
                       for _ in range(150)) + "</s>" for _ in range(512)]
    encoder = WordCacheEncoder.for_tokenizer(tok)
    out["unique"] = {"ids": us_per_text(lambda ts: [encoder.ids(t) for t in ts], unique),
                     "encode_batch_fast": us_per_text(batched(backend.encode_batch_fast), unique, 3)}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--families", default="gpt2,qwen2,llama3")
    args = p.parse_args(argv)
    paths = generate_mix(Path(args.workdir), args.n)
    raws = [json.loads(line) for line in Path(paths["data_path"]).read_text().splitlines()]
    corpus = llava_json_texts([paths["data_path"]])
    for family in args.families.split(","):
        print(json.dumps(measure(family, raws, corpus)), flush=True)
    print(json.dumps({"load": [round(x, 2) for x in os.getloadavg()]}))


if __name__ == "__main__":
    main()
