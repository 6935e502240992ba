"""Shared fixtures: a small synthetic shapes dataset and tiny real models written to disk once per session.

Everything is built locally (no hub): the models load through the same ``from_pretrained`` path as real ones.
"""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# training caches its dataset index under $LLAVA_CACHE (default ~/.cache/llava): one fresh folder per test session,
# inherited by the launched training processes, so no test reads an index another session left behind
os.environ["LLAVA_CACHE"] = tempfile.mkdtemp(prefix="llava-test-cache-")


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> dict:
    """``{"image_folder", "stage1_captions", "stage2_qa", "heldout_qa"}`` for a small shapes dataset."""
    from llava.demo.shapes import generate_shapes_dataset

    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_caption=96, n_qa=96, n_heldout=32, seed=0)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, shapes_data) -> dict:
    """``{"vision_tower": CLIP dir, "siglip_tower": SigLIP dir, "llm": Llama dir}``."""
    from llava.demo.tiny_models import write_demo_models, write_tiny_vision_tower

    workdir = tmp_path_factory.mktemp("models")
    paths = dict(write_demo_models(workdir, shapes_data))
    paths["siglip_tower"] = write_tiny_vision_tower(workdir / "models" / "tiny-siglip-vision", kind="siglip")
    return paths


@pytest.fixture(scope="session")
def bad_corpus(tmp_path_factory) -> dict:
    """A JSONL corpus with one record per problem kind of ``llava data check`` plus 8 good records.

    ``{"data_path", "image_folder", "expected": {kind: [record ids]}}``; use ``--model_max_length 64`` (the tiny
    CLIP tower gives 16 image tokens) and ``--version vicuna_v1``.
    """
    import json
    import struct
    import zlib

    from PIL import Image

    root = tmp_path_factory.mktemp("bad_corpus")
    folder = root / "images"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (40 + i, 32), (20 * i, 100, 200)).save(folder / f"good{i}.png")
    Image.new("L", (32, 32), 128).save(folder / "gray.png")
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    Image.effect_noise((64, 64), 50).convert("RGB").save(folder / "full.png")
    data = (folder / "full.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "garbage.jpg").write_bytes(b"<html>not an image</html>")

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # 400M pixels: above the bomb limit
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                                      + chunk(b"IEND", b""))
    Image.new("RGB", (8, 8)).save(root / "outside.png")

    def rec(rid, image=None, question="<image>\nWhat is it?", answer="A shape.", **extra):
        r = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
        if image is not None:
            r["image"] = image
        r.update(extra)
        return r

    lines = [json.dumps(rec(f"good{i}", f"good{i}.png")) for i in range(8)]
    lines += [json.dumps(r) for r in [
        rec("text_only", question="What is 2+2?", answer="4"),
        rec("gray", "gray.png"), rec("anim", "anim.gif"),
        rec("dup", "good0.png"), rec("dup", "good1.png"),
        {"id": "noconv", "image": "good0.png"},
        {"id": "badtype", "conversations": "hello"},
        {"id": "badrole", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"id": "badorder", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "yo"}]},
        {"id": "noassistant", "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "emptytext", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]},
        rec("mismatch", "good0.png", question="What is it?"),
        rec("missing", "nope.jpg"), rec("absolute", "/etc/hostname"), rec("escape", "../outside.png"),
        rec("unreadable", "garbage.jpg"), rec("truncated", "truncated.png"), rec("bomb", "bomb.png"),
        {"id": "toomany", "images": [f"good{i}.png" for i in range(5)],
         "conversations": [{"from": "human", "value": "<image>" * 5 + "\nSame?"}, {"from": "gpt", "value": "Yes."}]},
        rec("nosupervised", "good2.png", question="<image>\n" + "tell me about this picture please " * 20),
        rec("long_ok", "good3.png", question="<image>\nDescribe.", answer="a red circle on the left " * 20),
    ]]
    lines.insert(3, "{this is not json")
    data_path = root / "data.jsonl"
    data_path.write_text("\n".join(lines) + "\n")
    expected = {
        "invalid_json": ["line 4"], "missing_conversations": ["noconv"], "bad_type": ["badtype"], "bad_role": ["badrole"],
        "bad_role_order": ["badorder"], "no_assistant_turn": ["noassistant"], "empty_text": ["emptytext"],
        "image_token_mismatch": ["mismatch"], "image_missing": ["missing"], "image_absolute_path": ["absolute"],
        "image_outside_folder": ["escape"], "image_unreadable": ["unreadable"], "image_truncated": ["truncated"],
        "image_too_large": ["bomb"], "image_converted": ["gray", "anim"], "image_animated": ["anim"], "duplicate_id": ["dup"],
        "image_tokens_exceed_max_length": ["toomany"], "no_supervised_tokens": ["nosupervised"],
    }
    return {"data_path": data_path, "image_folder": folder, "expected": expected}


@pytest.fixture(scope="session")
def sentencepiece_tokenizer_dir(tmp_path_factory):
    """A real Llama-family SentencePiece tokenizer (Mistral-7B v0.1's, shipped by ``mistral-common``) as a
    ``LlamaTokenizer`` directory: ``tokenizer("A")`` gives ``['<s>', '▁A']``. Nothing is downloaded."""
    import json
    import shutil
    from pathlib import Path

    import mistral_common

    out = tmp_path_factory.mktemp("sentencepiece_tokenizer")
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 4096,
    }))
    return out


@pytest.fixture(scope="session")
def anyres_data(tmp_path_factory) -> dict:
    """Images of many sizes and aspect ratios (incl. 12x300 and 700x500) for the anyres tests.

    ``{"image_folder", "train": JSON path (single-image, two-image and text-only records), "sizes": {name: (h, w)}}``.
    """
    import json
    import random

    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("anyres_data")
    rng = random.Random(0)
    sizes = {"wide.png": (12, 300), "tall.png": (300, 12), "big.png": (700, 500)}
    sizes.update({f"img{i}.png": (rng.randint(16, 260), rng.randint(16, 260)) for i in range(21)})
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    records = []
    for i, (name, (h, w)) in enumerate(sizes.items()):
        colour = list(colours)[i % 3]
        image = Image.new("RGB", (w, h), (235, 235, 235))
        ImageDraw.Draw(image).rectangle([w // 4, h // 4, max(w // 4, 3 * w // 4), max(h // 4, 3 * h // 4)],
                                        fill=colours[colour])
        image.save(root / name)
        records.append({"id": f"r{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the box?"}, {"from": "gpt", "value": colour}]})
    records.append({"id": "two", "images": ["wide.png", "img0.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nDo they match?"}, {"from": "gpt", "value": "no"}]})
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]})
    (root / "train.json").write_text(json.dumps(records))
    return {"image_folder": root, "train": root / "train.json", "sizes": sizes}


@pytest.fixture(scope="session")
def sft_checkpoint(tiny_models, anyres_data, tmp_path_factory):
    """A stage-2 run of the tiny models on the anyres images (pad): a native Llava checkpoint, DPO's starting point."""
    from llava.train.train import train

    out = tmp_path_factory.mktemp("sft")
    train(["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
           "--version", "vicuna_v1", "--data_path", str(anyres_data["train"]),
           "--image_folder", str(anyres_data["image_folder"]), "--image_aspect_ratio", "pad",
           "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_steps", "2",
           "--learning_rate", "1e-3", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True",
           "--seed", "0", "--model_max_length", "512"])
    return out


@pytest.fixture(scope="session")
def dpo_pairs(anyres_data, tmp_path_factory):
    """8 LLaVA-NeXT preference records over the anyres images: the right colour chosen, the next one rejected."""
    import json

    colours = ("red", "green", "blue")
    records = []
    for r in json.loads(anyres_data["train"].read_text())[:8]:
        right = r["conversations"][1]["value"]
        records.append({"id": f"p{r['id']}", "image": r["image"], "prompt": "What colour is the box?",
                        "chosen": right, "rejected": colours[(colours.index(right) + 1) % 3]})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
