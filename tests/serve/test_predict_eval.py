"""Serving: ``Predictor`` greedy answers, ``evaluate`` accuracy per question type (real and blank images), tables.

A tiny stage-2 model is trained once for the module. Answers are checked against a hand-written greedy loop over the
model's forward; accuracies against a recount from the held-out JSON and against a stub predictor with known answers.

    .venv/bin/pytest tests/serve/test_predict_eval.py
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava.data.records import Message
from llava.run_dir import ARGS_FILE
from llava.serve.eval import evaluate, format_table
from llava.serve.predict import Predictor
from llava.train.train import train


@pytest.fixture(scope="module")
def stage2_dir(tiny_models, shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_stage2")
    train(["--model_name_or_path", str(tiny_models["llm"]), "--vision_tower", str(tiny_models["vision_tower"]),
           "--version", "vicuna_v1", "--data_path", str(shapes_data["stage2_qa"]),
           "--image_folder", str(shapes_data["image_folder"]), "--output_dir", str(out),
           "--per_device_train_batch_size", "8", "--max_steps", "60", "--learning_rate", "3e-3",
           "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none",
           "--model_max_length", "256", "--use_cpu", "True", "--seed", "0"])
    return out


@pytest.fixture(scope="module")
def predictor(stage2_dir):
    return Predictor.load(stage2_dir)


@pytest.fixture(scope="module")
def heldout(shapes_data):
    """id -> (question_type, gold answer, image path), read straight from the JSON."""
    records = json.loads(shapes_data["heldout_qa"].read_text())
    return {r["id"]: (r["question_type"], r["conversations"][-1]["value"], r["image"]) for r in records}


def manual_greedy(model, processor, prompt_ids: list[int], image: Image.Image, max_new_tokens: int) -> str:
    """Greedy decoding with a full forward per step (no cache, no ``generate``)."""
    tokenizer = processor.tokenizer
    pixel_values = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    ids = list(prompt_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           pixel_values=pixel_values).logits
        token = int(logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        ids.append(token)
        new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_answer_equals_manual_greedy_decode(stage2_dir, predictor, shapes_data, heldout):
    model = LlavaForConditionalGeneration.from_pretrained(stage2_dir).eval()
    processor = AutoProcessor.from_pretrained(stage2_dir)
    image_id = model.config.image_token_id
    answers = []
    for record_id in list(heldout)[:3]:
        _, _, rel = heldout[record_id]
        image = Image.open(shapes_data["image_folder"] / rel).convert("RGB")
        prompt = "What colour are the shapes? Answer with one word."
        got = predictor.answer(image, prompt, max_new_tokens=6)
        assert isinstance(got, str)
        prompt_ids = predictor.prompt_ids([Message("user", f"<image>\n{prompt}")])
        assert prompt_ids.count(image_id) == (64 // 16) ** 2  # one token per CLIP patch, CLS dropped
        assert got == manual_greedy(model, processor, prompt_ids, image, max_new_tokens=6)
        answers.append(got)
    assert any(answers), "the tiny model should say something, or this comparison proves little"


def test_prompt_is_what_training_and_the_saved_chat_template_give(stage2_dir, predictor, tmp_path):
    """``llava predict`` / ``eval`` prompt ids: the BOS as its id, a single ``<image>`` moved to the front of its turn
    (the run's default ``--image_placement front``), equal to the checkpoint processor's own chat template and
    tokenization; a run trained with ``--image_placement keep`` is served with the record's placement."""
    processor = AutoProcessor.from_pretrained(stage2_dir)
    question = "Which colour is it? <image>"
    ids = predictor.prompt_ids([Message("user", question)])
    text = processor.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    assert ids == processor(text=text, images=[Image.new("RGB", (64, 64))])["input_ids"][0]
    assert ids[0] == processor.tokenizer.bos_token_id and ids.count(ids[0]) == 1
    assert ids == predictor.prompt_ids([Message("user", "<image>\nWhich colour is it?")])
    kept_dir = tmp_path / "kept"
    shutil.copytree(stage2_dir, kept_dir)
    run = json.loads((kept_dir / ARGS_FILE).read_text())
    run["data_args"]["image_placement"] = "keep"
    (kept_dir / ARGS_FILE).write_text(json.dumps(run))
    kept = Predictor.load(kept_dir)
    assert kept.template.image_front is False
    kept_ids = kept.prompt_ids([Message("user", question)])
    image_id = predictor.model.config.image_token_id
    assert kept_ids.count(image_id) == ids.count(image_id) and kept_ids.index(image_id) > ids.index(image_id)


def test_batched_generation_equals_one_at_a_time(predictor, shapes_data, heldout):
    """Left padding in a batch must not change greedy answers."""
    items = list(heldout.values())[:4]
    images = [[Image.open(shapes_data["image_folder"] / rel).convert("RGB")] for _, _, rel in items]
    questions = ["What colour are the shapes?", "How many shapes are there? Answer with one word.", "Where?",
                 "Which shape do you see? Answer with one word."]
    conversations = [[Message("user", f"<image>\n{q}")] for q in questions]
    batched = predictor.generate(conversations, images, max_new_tokens=6)
    single = [predictor.generate([c], [im], max_new_tokens=6)[0] for c, im in zip(conversations, images)]
    assert batched == single


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def _recount(predictions: list[dict], heldout: dict) -> dict[str, float]:
    correct, total = defaultdict(int), defaultdict(int)
    for p in predictions:
        kind, gold, _ = heldout[p["id"]]
        total[kind] += 1
        correct[kind] += _normalize(p["answer"]) == _normalize(gold)
    acc = {k: correct[k] / total[k] for k in total}
    acc["overall"] = sum(correct.values()) / sum(total.values())
    return acc


def test_evaluate_accuracy_equals_recount(predictor, shapes_data, heldout):
    result = evaluate(predictor, str(shapes_data["heldout_qa"]), str(shapes_data["image_folder"]),
                      batch_size=8, limit=16, show_progress=False)
    assert [p["id"] for p in result.predictions] == list(heldout)[:16]
    assert all(p["gold"] == heldout[p["id"]][1] and p["type"] == heldout[p["id"]][0] for p in result.predictions)
    assert result.accuracy() == pytest.approx(_recount(result.predictions, heldout))


class StubPredictor:
    """Answers record i with the gold answer (upper-cased, with a full stop) when i % 3 == 0, else "nonsense"."""

    def __init__(self, golds: list[str]):
        self.golds, self.calls = golds, []

    def generate(self, conversations, images, max_new_tokens=16):
        start = sum(len(c[0]) for c in self.calls)
        self.calls.append((conversations, images))
        return [f"{self.golds[i].upper()}." if i % 3 == 0 else "nonsense"
                for i in range(start, start + len(conversations))]


@pytest.mark.parametrize("blank", [False, True])
def test_evaluate_known_accuracy_and_image_handling(shapes_data, heldout, blank):
    items = list(heldout.values())
    stub = StubPredictor([gold for _, gold, _ in items])
    result = evaluate(stub, str(shapes_data["heldout_qa"]), str(shapes_data["image_folder"]), batch_size=5,
                      blank_images=blank, show_progress=False)
    expected_correct, expected_total = defaultdict(int), defaultdict(int)
    for i, (kind, _, _) in enumerate(items):
        expected_total[kind] += 1
        expected_correct[kind] += i % 3 == 0
    expected = {k: expected_correct[k] / expected_total[k] for k in expected_total}
    expected["overall"] = sum(expected_correct.values()) / len(items)
    assert result.accuracy() == pytest.approx(expected)
    assert len(expected) == 5  # colour, shape, position, count + overall
    # the prompt is the record's question; the images are the files' images, or blank ones of the same size
    seen = [(conv, ims) for conversations, images in stub.calls for conv, ims in zip(conversations, images)]
    assert len(seen) == len(items)
    for (conv, ims), (_, _, rel) in zip(seen, items):
        assert conv[-1].role == "user" and "<image>" in conv[0].content
        original = np.asarray(Image.open(shapes_data["image_folder"] / rel).convert("RGB"))
        assert len(ims) == 1 and np.asarray(ims[0]).shape == original.shape
        if blank:
            assert (np.asarray(ims[0]) == 255).all()
        else:
            assert (np.asarray(ims[0]) == original).all()


@pytest.mark.parametrize("blank", [False, True])
def test_evaluate_feeds_the_model_real_or_blank_pixels(predictor, shapes_data, heldout, monkeypatch, blank):
    """The pixel tensors reaching the model are those of the files, or of white images, in record order."""
    recorded = []
    original = Predictor.pixel_values

    def spy(self, images):
        values = original(self, images)
        recorded.append(values)
        return values

    monkeypatch.setattr(Predictor, "pixel_values", spy)
    result = evaluate(predictor, str(shapes_data["heldout_qa"]), str(shapes_data["image_folder"]), batch_size=8,
                      limit=16, blank_images=blank, show_progress=False)
    processor = predictor.processor.image_processor
    paths = [shapes_data["image_folder"] / heldout[p["id"]][2] for p in result.predictions]
    images = [Image.open(path).convert("RGB") for path in paths]
    if blank:
        images = [Image.new("RGB", im.size, (255, 255, 255)) for im in images]
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(torch.cat(recorded), expected)
    assert result.accuracy() == pytest.approx(_recount(result.predictions, heldout))


def test_format_table_shows_both_rows():
    rows = {"real images": {"colour": 1.0, "shape": 0.5, "overall": 0.75},
            "blank images": {"colour": 0.25, "shape": 0.0, "overall": 0.125}}
    table = format_table(rows)
    header, real, blank = table.splitlines()
    assert header.split() == ["colour", "shape", "overall"]
    assert real.startswith("real images") and real.split()[2:] == ["100.0%", "50.0%", "75.0%"]
    assert blank.startswith("blank images") and blank.split()[2:] == ["25.0%", "0.0%", "12.5%"]


def test_eval_report_page_of_a_llava_checkpoint(stage2_dir, shapes_data, tmp_path, capsys):
    """``llava eval --report``: the page of a trained Llava checkpoint, checked against the printed JSON (#26)."""
    from tests.report.page_checks import eval_report_via_cli, screenshot

    page = eval_report_via_cli(stage2_dir, shapes_data["heldout_qa"], shapes_data["image_folder"], tmp_path / "report",
                               capsys)
    assert len(page.rows) == 32
    screenshot(tmp_path / "report" / "index.html", tmp_path / "eval_llava.png")


def test_eval_reads_parquet_with_embedded_images_as_json_with_files(stage2_dir, predictor, shapes_data, tmp_path,
                                                                    capsys):
    """``llava eval --data heldout.parquet`` (the images' bytes in the rows, no --image_folder) scores and shows what
    the JSON + image folder gives: the same answers and marks; the page's thumbnails are those of the same images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llava.cli import main
    from llava.report.eval_page import write_eval_report
    from tests.report.page_checks import check_eval_page

    records = json.loads(shapes_data["heldout_qa"].read_text())[:12]
    twin = tmp_path / "heldout.json"
    twin.write_text(json.dumps(records))
    rows = [{**{k: v for k, v in r.items() if k != "image"},
             "image": {"bytes": (shapes_data["image_folder"] / r["image"]).read_bytes(), "path": None}} for r in records]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "heldout.parquet")
    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["eval", "--model", str(stage2_dir), "--data", str(tmp_path / "heldout.parquet"), "--batch_size", "5",
                 "--json", "--report", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-2])
    page = check_eval_page(out, accuracy_json=printed, expected_ids=[r["id"] for r in records])
    embedded = json.loads((out / "eval_results.json").read_text())["predictions"]["real images"]
    assert [p["images"] for p in embedded] == [[f"heldout.parquet#row={i}/image[0]"] for i in range(len(records))]
    files = evaluate(predictor, str(twin), str(shapes_data["image_folder"]), batch_size=5, show_progress=False)
    assert [(p["id"], p["answer"], p["correct"]) for p in embedded] == [
        (p["id"], p["answer"], p["correct"]) for p in files.predictions]
    assert printed["real images"] == files.accuracy()
    for row, record in zip(page.rows, records):  # each thumbnail shows the record's own image
        (src,) = row["images"]
        shown = np.asarray(Image.open(out / src).convert("RGB"))
        assert (shown == np.asarray(Image.open(shapes_data["image_folder"] / record["image"]).convert("RGB"))).all()
    write_eval_report(tmp_path / "from_files", {"real images": files}, image_folder=str(shapes_data["image_folder"]))
    assert len(check_eval_page(tmp_path / "from_files").images) == len(records)
