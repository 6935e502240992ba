"""``llava/data/word_cache.py`` gives the ids and offsets the Rust tokenizer gives, text for text.

    WANDB_MODE=offline HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/data/test_word_cache.py

Reference: ``backend.encode(text, add_special_tokens=False)`` of byte-level BPE tokenizers, with ``<image>`` added as
the index adds it: the tiny models' (GPT-2 pre-tokenizer), and BPEs trained here with Llama-3's and Qwen2's pipelines
as their tokenizer.json files have them (``Split`` pattern + ``ByteLevel``, Qwen2's NFC, Llama-3's BOS template),
and transformers' own ``Qwen2Tokenizer`` over such a vocabulary.
Texts: every conversation of the benchmark's synthetic mix rendered by three templates, and random texts drawn from
the pieces the split patterns treat differently (contractions in either case, runs of 1-7 digits, punctuation, every
ASCII control character, runs of spaces/tabs/newlines and ``\\r\\n``, the added tokens and fragments of them,
non-ASCII characters that must be handed back). The index over the benchmark mix is the same with the word cache and
without it. Pipelines the cache does not know (another split pattern, a normaliser that changes ASCII, ...) are
refused.
"""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from llava.data import index_batch
from llava.data.index import IndexSettings, InMemoryRecords, build_index
from llava.data.records import parse_record
from llava.data.templates import get_template
from llava.data.tokenize import prepare_messages, supervised_text
from llava.data.word_cache import SPLITS_ASCII, WordCacheEncoder
from llava.demo.tiny_models import llava_json_texts, train_tiny_tokenizer
from llava.model.builder import add_multimodal_tokens

# The Split regexes of Llama-3's (meta-llama/Meta-Llama-3-8B) and Qwen2's (Qwen/Qwen2-7B-Instruct; Qwen3 has the same)
# tokenizer.json, copied from those files' text, apart from word_cache's own copies.
REAL_SPLITS = {
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}


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


PIECES = ["a", "b", "Zq", "ba", "hello", " world", "'", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re",
          "'vE", "'D", "'T", "'M", "'x", "0", "12", "123", "1234", "12345", "1234567", "3.5", "!", "?.", "-", ":", "(",
          ")", "_", "$", "\\", "\"", " ", "  ", "   ", "\n", "\n\n", "\t", "\r", "\r\n", "\r\n\r\n", ".\r\n", " \n",
          "\x0b", "\x0c", "\x1c", "\x1f", "\x00", "\x7f", "<image>", "</s>", "<s>", "[INST]", "[/INST]", "<|eot_id|>",
          "<|im_end|>", "<|im_", "</", "<", ">", "[", "USER:", " ASSISTANT:", "é", "日本", "🚀", "\u00a0", "\u2028"]


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
    backend.add_tokens([AddedToken("ab", normalized=True), AddedToken("b c", normalized=True),
                        AddedToken("</s>x", normalized=True)])
    encoder = WordCacheEncoder.for_tokenizer(backend)
    assert encoder is not None and encoder.split_norm is not None
    texts = _random_texts(3000, seed=1) + ["ab c", "b c</s>x", "</s>xab", "a</s>b c"]
    assert _check(encoder, backend, texts) > 500


def test_other_pipelines_are_not_handled(mix):
    """A normaliser that changes ASCII, a prefix space, a pre-tokenizer other than GPT-2's, an added token that
    strips, a post-processor that trims offsets: None."""
    spec = mix["tok"]._tokenizer.to_str()
    variants = []
    for change in ("lowercase", "normalizers", "prefix", "whitespace", "lstrip", "trim"):
        backend = Tokenizer.from_str(spec)
        if change == "lowercase":
            backend.normalizer = normalizers.Lowercase()
        elif change == "normalizers":  # identities on ASCII, but a Sequence is not one of the forms it knows
            backend.normalizer = normalizers.Sequence([normalizers.NFC()])
        elif change == "prefix":
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        elif change == "whitespace":
            backend.pre_tokenizer = pre_tokenizers.Whitespace()
        elif change == "lstrip":
            backend.add_tokens([AddedToken("<x>", lstrip=True)])
        else:
            backend.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=True)])
        variants.append(WordCacheEncoder.for_tokenizer(backend))
    assert variants == [None] * 6


@pytest.mark.parametrize("form", ["NFC", "NFD", "NFKC", "NFKD"])
def test_unicode_normal_forms_are_handled_on_ascii(mix, form):
    """The four normal forms leave ASCII as it is: the encoder takes them and equals the backend that runs them."""
    backend = Tokenizer.from_str(mix["tok"]._tokenizer.to_str())
    backend.normalizer = getattr(normalizers, form)()
    encoder = WordCacheEncoder.for_tokenizer(backend)
    assert encoder is not None
    assert _check(encoder, backend, _random_texts(1500, seed=4)) > 300


def _same_index(tok, mix, monkeypatch, template="vicuna_v1"):
    """The benchmark mix's index (kept records, lengths, drops) is the same when every text goes to the tokenizer;
    at a short --model_max_length many samples are truncated (the offsets path)."""
    tpl = get_template(template)
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


def test_index_with_and_without_the_word_cache(mix, monkeypatch):
    _same_index(mix["tok"], mix, monkeypatch)


def test_route_measures_both_ways_then_takes_the_cheaper_and_probes_the_other():
    route = index_batch.Route()
    assert route.pick() == "cache"
    route.measured("cache", 2.0, 1000)  # 2 ms a character: a source of unique words
    assert route.pick() == "rust"
    route.measured("rust", 1.0, 1000)
    assert route.pick() == "cache"  # measured again warm (its first batch filled it)
    route.measured("cache", 2.0, 1000)
    picks = [route.pick() for _ in range(4, 4 + 2 * route.PROBE)]
    assert picks.count("cache") == 2 and set(picks) == {"cache", "rust"}  # the cheaper way, the other every PROBE-th
    for _ in range(3):  # the cache warms up: its measures fall under the Rust call's, and it is taken again
        route.measured("cache", 0.1, 1000)
    assert route.cost["cache"] < route.cost["rust"] and route.pick() == "cache"


def test_route_measures_the_cache_again_after_its_cold_first_batch():
    """The word cache's first batch fills it (its cost then is a cold one); the third batch measures it again and
    that measure replaces the first, so a cache that is cheaper once warm is picked from the fourth batch. A cache
    that stays dearer (unique words) is measured once more, then only at the probes."""
    def run(cache_costs, rust_cost, batches):
        route, ways = index_batch.Route(), []
        cache_costs = iter(cache_costs)
        for _ in range(batches):
            way = route.pick()
            ways.append(way)
            route.measured(way, next(cache_costs) if way == "cache" else rust_cost, 1)
        return ways

    warming = run([500e-9] + [40e-9] * 100, 260e-9, 70)  # the benchmark mix: cold 2x the Rust call, warm 1/6
    assert warming[:4] == ["cache", "rust", "cache", "cache"]
    assert warming.count("rust") == 2  # its first measure, and the probe of batch 64
    unique = run([500e-9] * 100, 260e-9, 70)  # every word new: the cache stays ~2x the Rust call
    assert unique[:3] == ["cache", "rust", "cache"] and unique.count("cache") == 3  # batches 1, 3 and the probe 64


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


def _spaces(n, seed):
    rng = random.Random(seed)
    return ["".join(rng.choice(" \t\n\x0b\x0c\rab.1") for _ in range(rng.randint(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def split_tok(request, mix):
    """``train_tiny_tokenizer(family=...)``: the real files' pipeline (its split regex checked against the text copied
    above), trained on the mix's texts, random texts and runs of white space: it merges white space,
    punctuation-led letter words and digit groups, so a wrong cut changes ids."""
    tok = train_tiny_tokenizer(llava_json_texts([mix["data_path"]]) + _random_texts(4000, seed=7) + _spaces(4000, 8),
                               family=request.param)
    add_multimodal_tokens(tok, False)
    spec = json.loads(tok._tokenizer.to_str())
    assert spec["pre_tokenizer"]["pretokenizers"][0]["pattern"] == {"Regex": REAL_SPLITS[request.param]}
    vocab = tok._tokenizer.get_vocab()
    assert {"ĠĠ", "ĊĊ", "ĠĊ", "čĊ"} <= set(vocab), "the trained merges join white space"
    assert any(len(t) > 1 and t[0] in "ĉ.(_$" and t[1:].isalpha() for t in vocab), "and punctuation-led words"
    return request.param, tok


def test_split_patterns_are_recognised_from_the_pre_tokenizer(split_tok):
    family, tok = split_tok
    encoder = WordCacheEncoder.for_tokenizer(tok)
    assert encoder is not None
    assert encoder.words == SPLITS_ASCII[REAL_SPLITS[family]].findall


@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen2"])
def test_words_equal_the_pre_tokenizer(family):
    """The ASCII pattern's words are the Rust pre-tokenizer's (the split alone, any vocabulary): on ASCII texts made
    of the pieces, with no added tokens."""
    if family == "gpt2":
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(REAL_SPLITS[family]), behavior="isolated"),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre
    words = WordCacheEncoder.for_tokenizer(backend).words
    texts = [t for t in _random_texts(8000, seed=11) + _spaces(2000, 12) if t.isascii()]
    assert len(texts) > 3000
    for text in texts:
        assert words(text) == [text[a:b] for _, (a, b) in pre.pre_tokenize_str(text)], repr(text)


def test_split_tokenizers_rendered_mix_equal_the_tokenizer(split_tok, mix):
    _, tok = split_tok
    encoder = WordCacheEncoder.for_tokenizer(tok)
    for name in ("vicuna_v1", "llama3", "chatml"):
        texts = _rendered(mix["raws"], tok, get_template(name))
        assert _check(encoder, tok._tokenizer, texts) == len(texts)
    assert len(encoder.ids_of) > 100 and encoder.first_of and encoder.spaced_of  # words and chunks were cached


def test_split_tokenizers_random_texts_equal_the_tokenizer(split_tok):
    _, tok = split_tok
    encoder = WordCacheEncoder.for_tokenizer(tok)
    texts = (_random_texts(6000, seed=2) + _spaces(3000, 3)
             + ["a  b", "a \nb", "a\n b", "x \t y", " lead", "trail ", "it'S 'LL", "a.b c", "\tab c", "1234567 89"])
    assert _check(encoder, tok._tokenizer, texts) > 4000


def test_split_index_with_and_without_the_word_cache(split_tok, mix, monkeypatch):
    _, tok = split_tok
    _same_index(tok, mix, monkeypatch, "llama3" if split_tok[0] == "llama3" else "chatml")


def test_unknown_split_pipelines_are_refused(mix):
    """A Split regex the cache does not know (one digit more per group), another behaviour, an inverted split, a
    byte-level step that splits again or adds a prefix space, a string pattern, another step: None, so the texts go
    to the Rust tokenizer."""
    spec = mix["tok"]._tokenizer.to_str()

    def split(pattern=None, behavior="isolated", invert=False, **byte_level):
        pattern = Regex(REAL_SPLITS["llama3"]) if pattern is None else pattern
        return [pre_tokenizers.Split(pattern, behavior=behavior, invert=invert),
                pre_tokenizers.ByteLevel(**{"add_prefix_space": False, "use_regex": False, **byte_level})]

    variants = [split(Regex(REAL_SPLITS["llama3"].replace("{1,3}", "{1,4}"))),
                split(Regex(REAL_SPLITS["qwen2"] + "|x")), split(behavior="merged_with_previous"),
                split(invert=True), split(use_regex=True), split(add_prefix_space=True), split(pattern=" "),
                [*split(), pre_tokenizers.Digits()], split()[::-1]]
    got = []
    for steps in [split(), *variants]:
        backend = Tokenizer.from_str(spec)
        backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
        got.append(WordCacheEncoder.for_tokenizer(backend) is None)
    assert got == [False] + [True] * len(variants)  # the known pipeline is taken, its variants refused


def test_transformers_qwen2_tokenizer_is_taken(mix):
    """transformers' own ``Qwen2Tokenizer``, whose class builds the pipeline (NFC, the Qwen2 split, its
    post-processor), over a vocabulary trained here: taken, and equal to its backend on the rendered mix and random
    texts."""
    from transformers import Qwen2Tokenizer

    trained = train_tiny_tokenizer(llava_json_texts([mix["data_path"]]) + _random_texts(2000, seed=9), family="qwen2")
    model = json.loads(trained._tokenizer.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    add_multimodal_tokens(tok, False)
    encoder = WordCacheEncoder.for_tokenizer(tok)
    assert encoder is not None
    texts = _rendered(mix["raws"], tok, get_template("chatml"))
    assert _check(encoder, tok._tokenizer, texts) == len(texts)
    assert _check(encoder, tok._tokenizer, _random_texts(3000, seed=10)) > 500
