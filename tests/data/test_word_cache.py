"""``llava/data/word_cache.py`` gives the ids and offsets the Rust tokenizer gives, text for text.

    WANDB_MODE=offline HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/data/test_word_cache.py

Reference: ``backend.encode(text, add_special_tokens=False)`` of the tiny models' byte-level BPE tokenizer (GPT-2
pre-tokenizer, with ``<image>`` added as the index adds it). Texts: every conversation of the benchmark's synthetic
mix rendered by three templates, and random texts drawn from the pieces the split pattern treats differently
(contractions, digits, punctuation, every ASCII control character, runs of spaces/tabs/newlines, the added tokens and
fragments of them, non-ASCII characters that must be handed back). The index over the benchmark mix is the same with
the word cache and without it.
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from transformers import AutoTokenizer

from llava.data import index_batch
from llava.data.index import IndexSettings, InMemoryRecords, build_index
from llava.data.records import parse_record
from llava.data.templates import get_template
from llava.data.tokenize import prepare_messages, supervised_text
from llava.data.word_cache import WordCacheEncoder
from llava.model.builder import add_multimodal_tokens


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    from llava.demo.synthetic_mix import generate_mix, write_bench_models

    root = tmp_path_factory.mktemp("word_cache_mix")
    paths = generate_mix(root, 400)
    paths.update(write_bench_models(root, paths["data_path"], size="tiny"))
    tok = AutoTokenizer.from_pretrained(paths["llm"])
    add_multimodal_tokens(tok, False)
    raws = [json.loads(line) for line in paths["data_path"].read_text().splitlines()]
    return {"tok": tok, "raws": raws, **paths}


def _rendered(raws, tok, template):
    texts = []
    for i, raw in enumerate(raws):
        record = parse_record(raw, i)
        segments = template.render_with_tokenizer(prepare_messages(record.messages, template, False), tok)
        texts.append(supervised_text([s for s in segments if not s.special])[0])
    return texts


PIECES = ["a", "b", "Zq", "ba", "hello", " world", "'", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'x",
          "0", "12", "3.5", "!", "?.", "-", ":", "(", ")", "\\", "\"", " ", "  ", "   ", "\n", "\n\n", "\t", "\r",
          "\r\n", " \n", "\x0b", "\x0c", "\x1c", "\x1f", "\x00", "\x7f", "<image>", "</s>", "<s>", "[INST]", "[/INST]",
          "<|eot_id|>", "<|im_end|>", "<|im_", "</", "<", ">", "[", "USER:", " ASSISTANT:", "é", "日本", "🚀", "\u00a0",
          "\u2028"]


def _random_texts(n, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def _check(encoder, backend, texts):
    """Every text the encoder handles gives the backend's ids and offsets; returns how many it handled."""
    handled = 0
    for text in texts:
        ref = backend.encode(text, add_special_tokens=False)
        got, ids = encoder.ids_offsets(text), encoder.ids(text)
        assert (got is None) == (ids is None) == (not text.isascii()), repr(text)
        if got is None:
            continue
        handled += 1
        assert ids == ref.ids, repr(text)
        assert (got[0], list(got[1])) == (ref.ids, ref.offsets), repr(text)
    return handled


def test_rendered_mix_equals_the_tokenizer(mix):
    tok = mix["tok"]
    encoder = WordCacheEncoder.for_tokenizer(tok)
    assert encoder is not None
    for name in ("vicuna_v1", "llama3", "chatml"):
        texts = _rendered(mix["raws"], tok, get_template(name))
        assert _check(encoder, tok._tokenizer, texts) == len(texts)  # the synthetic mix is ASCII: all handled
    assert len(encoder.ids_of) > 100  # the words were cached (and looked up for the 2nd and 3rd template)


def test_random_texts_equal_the_tokenizer(mix):
    tok = mix["tok"]
    encoder = WordCacheEncoder.for_tokenizer(tok)
    texts = _random_texts(6000)
    handled = _check(encoder, tok._tokenizer, texts)
    assert 1000 < handled < len(texts)  # both kinds present: ASCII texts compared, the others handed back


@pytest.fixture(scope="module")
def whitespace_bpe():
    """A byte-level BPE trained on the random texts themselves: it has merges for runs of spaces and newlines
    ("ĠĠ", "ĊĠ", ...), indented lines and contractions, which the benchmark tokenizer lacks, so a wrong cut at a
    space changes its ids."""
    from tokenizers import AddedToken, decoders, models, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    rng = random.Random(8)
    spaces = ["".join(rng.choice(" \t\n\x0b\x0c\rab") for _ in range(rng.randint(1, 30))) for _ in range(4000)]
    backend.train_from_iterator(_random_texts(4000, seed=7) + spaces, trainer=trainer)
    backend.add_special_tokens([AddedToken(t, normalized=False) for t in ("</s>", "<s>", "[INST]", "<|eot_id|>")])
    backend.add_tokens([AddedToken("<image>", normalized=False, special=True)])
    vocab = backend.get_vocab()
    assert {"ĠĠ", "ĊĊ", "ċĠ", "Ġċ", "ĊĠ"} <= set(vocab), "the trained merges join white space"
    return backend


def test_whitespace_merging_tokenizer_equals_the_tokenizer(whitespace_bpe):
    encoder = WordCacheEncoder.for_tokenizer(whitespace_bpe)
    assert encoder is not None
    rng = random.Random(3)
    spaces = ["".join(rng.choice([" ", "\t", "\n", "\x0b", "\x0c", "\r", "ab", "'s", "1", ".", "<image>"])
                      for _ in range(rng.randint(1, 20))) for _ in range(4000)]
    texts = _random_texts(6000, seed=2) + spaces + ["a  b", "a \nb", "a\n b", "a   b c", "x \t y", " lead", "trail "]
    assert _check(encoder, whitespace_bpe, texts) > 1000


def test_normalized_added_tokens_are_cut_after_the_raw_ones(mix):
    """Added tokens with ``normalized=True`` are matched in what the raw ones leave (tokenizers' two passes)."""
    backend = Tokenizer.from_str(mix["tok"]._tokenizer.to_str())
    from tokenizers import AddedToken

    backend.add_tokens([AddedToken("ab", normalized=True), AddedToken("b c", normalized=True),
                        AddedToken("</s>x", normalized=True)])
    encoder = WordCacheEncoder.for_tokenizer(backend)
    assert encoder is not None and encoder.split_norm is not None
    texts = _random_texts(3000, seed=1) + ["ab c", "b c</s>x", "</s>xab", "a</s>b c"]
    assert _check(encoder, backend, texts) > 500


def test_other_pipelines_are_not_handled(mix):
    """A normaliser, a prefix space, a pre-tokenizer other than GPT-2's, an added token that strips: None."""
    spec = mix["tok"]._tokenizer.to_str()
    variants = []
    for change in ("normalizer", "prefix", "whitespace", "lstrip"):
        backend = Tokenizer.from_str(spec)
        if change == "normalizer":
            backend.normalizer = normalizers.NFC()
        elif change == "prefix":
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        elif change == "whitespace":
            backend.pre_tokenizer = pre_tokenizers.Whitespace()
        else:
            from tokenizers import AddedToken

            backend.add_tokens([AddedToken("<x>", lstrip=True)])
        variants.append(WordCacheEncoder.for_tokenizer(backend))
    assert variants == [None] * 4


def test_index_with_and_without_the_word_cache(mix, monkeypatch):
    """The benchmark mix's index (kept records, lengths, drops) is the same when every text goes to the tokenizer;
    at a short --model_max_length many samples are truncated (the offsets path)."""
    tok, tpl = mix["tok"], get_template("vicuna_v1")
    for max_length in (96, 4096):
        s = IndexSettings(image_folder=str(mix["image_folder"]), image_token_id=tok.convert_tokens_to_ids("<image>"),
                          num_image_tokens=16, model_max_length=max_length)
        fast = build_index(InMemoryRecords(mix["raws"], []), tok, tpl, s, workers=1, show_progress=False)
        with monkeypatch.context() as m:
            m.setattr(index_batch, "word_encoder", lambda backend: None)
            plain = build_index(InMemoryRecords(mix["raws"], []), tok, tpl, s, workers=1, show_progress=False)
        assert fast.keep.tolist() == plain.keep.tolist() and fast.lengths.tolist() == plain.lengths.tolist()
        assert fast.problems == plain.problems and fast.dropped == plain.dropped
        if max_length == 96:
            assert (fast.lengths == 96).sum() > 50, "the short limit truncates many samples"


def test_route_measures_both_ways_then_takes_the_cheaper_and_probes_the_other():
    route = index_batch.Route()
    assert route.pick() == "cache"
    route.measured("cache", 2.0, 1000)  # 2 ms a character: a source of unique words
    assert route.pick() == "rust"
    route.measured("rust", 1.0, 1000)
    picks = [route.pick() for _ in range(3, 3 + 2 * route.PROBE)]
    assert picks.count("cache") == 2 and set(picks) == {"cache", "rust"}  # the cheaper way, the other every PROBE-th
    for _ in range(3):  # the cache warms up: its measures fall under the Rust call's, and it is taken again
        route.measured("cache", 0.1, 1000)
    assert route.cost["cache"] < route.cost["rust"] and route.pick() == "cache"


def test_unique_words_go_to_the_rust_call_and_give_the_same_ids(mix):
    """A stream of texts whose words are all new: the index's ids are the Rust call's whichever way it takes."""
    tok = mix["tok"]
    rng = random.Random(5)
    letters = "abcdefghijklmnopqrstuvwxyz"
    texts = [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(4, 12))) for _ in range(60)) + "</s>"
             for _ in range(40 * 64)]
    index_batch._ENCODER[:] = [None, None, None]
    got = [ids for b in range(0, len(texts), 64) for ids in index_batch._encode_ids(tok, texts[b : b + 64])]
    assert got == [e.ids for e in tok._tokenizer.encode_batch(texts, add_special_tokens=False)]
    route = index_batch.word_encoder(tok._tokenizer).routes["ids"]
    assert route.cost["cache"] is not None and route.cost["rust"] is not None  # both ways were measured
