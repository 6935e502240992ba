"""Exact ids (and offsets) of a byte-level BPE tokenizer (GPT-2's, Llama-3's, Qwen2's split), each word's tokens
computed once and cached.

    encoder = WordCacheEncoder.for_tokenizer(tokenizer)     # None unless the tokenizer is of the kind below
    encoder.ids(text)              # == backend.encode(text, add_special_tokens=False).ids, or None (not handled)
    encoder.ids_offsets(text)      # (ids, an iterator of the offsets) as the backend gives them, or None

What the Rust tokenizer does with a text, when its pipeline is: no normalizer or a Unicode normal form (NFC, NFD,
NFKC, NFKD: the identity on ASCII, which has no decompositions and no composites); a pre-tokenizer that splits words
by a pattern known here, then maps bytes (``ByteLevel`` with GPT-2's pattern, ``use_regex`` and no prefix space; or
``Sequence([Split(pattern, "isolated"), ByteLevel(use_regex=False)])`` with Llama-3's or Qwen2's pattern, recognised
from the pre-tokenizer's own JSON, not from a model name); a deterministic model (BPE without dropout); no
post-processor that moves offsets (``ByteLevel`` without ``trim_offsets``, ``TemplateProcessing``, a ``Sequence`` of
them); added tokens matched as written (no ``lstrip``/``rstrip``/``single_word``):

1. the added tokens are cut out of the text first, leftmost-longest (those matched before normalisation, then the
   ``normalized`` ones in what is left);
2. each piece between them is split into words by the pattern;
3. each word's bytes, mapped to the byte-level alphabet, go through the model alone.

The ids of a text are therefore its added tokens' ids and its words' ids, in order, and a word's ids do not depend on
its neighbours: they are computed once (``model.tokenize``) and looked up afterwards. Steps 1 and 2 are done here
with Python's ``re``; the patterns' Unicode classes (``\\p{L}``, ``\\p{N}``, ``\\s``) are written out for ASCII, so a
text is handled only when it is ASCII; any other text returns None and goes to the tokenizer itself.
``tests/data/test_word_cache.py`` holds the results equal to the backend's, for each of the three patterns, on the
benchmark mix's rendered texts and on random texts made of what the patterns treat differently (contractions in
either case, runs of digits, punctuation, control characters, runs of white space, added tokens and their fragments).
An offset is a character span of the text (ASCII: one byte, one byte-level character, one character).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

# GPT-2's pre-tokenizer pattern (tokenizers' ByteLevel, use_regex=True), run by Oniguruma:
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# on ASCII text: \p{L} = [A-Za-z], \p{N} = [0-9], \s = [\t\n\v\f\r ] (Unicode White_Space; Python's own \s adds
# \x1c-\x1f, so the classes are spelled out). The contractions are factored (they differ in their second
# character) and so is the optional space (a match without it starts on a non-space, where those with it fail).
_WS = r"\t\n\x0b\x0c\r "
GPT2_ASCII = re.compile(rf"'(?:[stmd]|re|ve|ll)| ?(?:[A-Za-z]+|[0-9]+|[^{_WS}A-Za-z0-9]+)"
                        rf"|[{_WS}]+(?![^{_WS}])|[{_WS}]+")
# Llama-3's and Qwen2's ``Split`` patterns, as their tokenizer.json files hold them (Qwen2 takes digits one at a
# time). On ASCII the case-insensitive contractions match either case of each letter (Unicode's other case folds,
# "ſ" for "s", are not ASCII); the alternatives keep their order (Oniguruma and ``re`` both take the first one that
# matches at a position, so "'sa" is "'s" + "a" while "'xa" is one letter word with its "'").
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _split_ascii(digits: str) -> re.Pattern:
    return re.compile(rf"'(?:[sStTmMdD]|[rR][eE]|[vV][eE]|[lL][lL])|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{digits}"
                      rf"| ?[^{_WS}A-Za-z0-9]+[\r\n]*|[{_WS}]*[\r\n]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+")


SPLITS_ASCII = {LLAMA3_SPLIT: _split_ascii("{1,3}"), QWEN2_SPLIT: _split_ascii("")}  # Split regex -> ASCII version
IDENTITY_ON_ASCII = ("NFC", "NFD", "NFKC", "NFKD")  # normalizers that leave an ASCII text as it is
WS_TO_SPACE = bytes.maketrans(b"\t\n\x0b\x0c\r", b"     ")  # "  " after this: a space next to white space
MAX_WORDS = 100_000  # cached words and chunks per process before the cache starts over (~350 bytes each)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> byte-level character table (the ``ByteLevel`` pre-tokenizer's alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_LEVEL = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items() if b < 128})


def _splitter(contents: list[str]) -> re.Pattern | None:
    """A pattern whose ``split`` cuts out ``contents`` leftmost-longest and keeps them (a capturing group): at each
    position the contents are tried longest first; grouped by first character (one test per position)."""
    if not contents:
        return None
    contents = sorted(contents, key=len, reverse=True)
    groups = {}
    for c in contents:
        groups.setdefault(c[0], []).append(re.escape(c[1:]))
    return re.compile("(" + "|".join(re.escape(first) + "(?:" + "|".join(rest) + ")" for first, rest in groups.items())
                      + ")")


def split_pattern(pre: dict) -> re.Pattern | None:
    """The ASCII version of the word split that the pre-tokenizer ``pre`` (its JSON) makes before mapping bytes:
    GPT-2's for ``ByteLevel(use_regex=True)``; a known ``Split`` regex (isolated, not inverted) followed by
    ``ByteLevel(use_regex=False)``. None for anything else (a prefix space, another pattern, more steps)."""
    kind = pre.get("type")
    if kind == "ByteLevel":
        return GPT2_ASCII if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    steps = pre.get("pretokenizers") or []
    if kind != "Sequence" or len(steps) != 2:
        return None
    split, byte_level = steps
    if not (split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
            and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space")):
        return None
    pattern = split.get("pattern") or {}
    return SPLITS_ASCII.get(pattern.get("Regex")) if set(pattern) == {"Regex"} else None


class WordCacheEncoder:
    """See the module docstring. Built by :meth:`for_tokenizer`, which checks the pipeline."""

    def __init__(self, backend, added: dict[str, tuple[int, bool]], pattern: re.Pattern = GPT2_ASCII):
        self.model = backend.model
        self.words = pattern.findall  # a piece -> its words (the pre-tokenizer's split, on ASCII)
        self.ids_of: dict[str, tuple[int, ...]] = {}
        self.lens_of: dict[str, tuple[int, ...]] = {}  # the characters each of a word's tokens covers
        self.first_of: dict[str, tuple[int, ...]] = {}  # a piece's first space-delimited chunk -> its ids
        self.spaced_of: dict[str, tuple[int, ...]] = {}  # a later chunk (key without its leading space) -> its ids
        self.added = {content: tid for content, (tid, _) in added.items()}
        raw = [c for c, (_, normalized) in added.items() if not normalized]
        norm = [c for c, (_, normalized) in added.items() if normalized]
        self.split_raw = _splitter(raw)
        self.split_norm = _splitter(norm)

    @classmethod
    def for_tokenizer(cls, tokenizer) -> WordCacheEncoder | None:
        """An encoder for ``tokenizer`` (a transformers fast tokenizer, or a ``tokenizers.Tokenizer``) when its
        pipeline is the one the module docstring describes, else None."""
        backend = getattr(tokenizer, "_tokenizer", tokenizer)
        if not all(hasattr(backend, a) for a in ("to_str", "model", "get_added_tokens_decoder")):
            return None
        if backend.truncation is not None or backend.padding is not None or getattr(backend, "encode_special_tokens",
                                                                                   False):
            return None
        try:
            spec = json.loads(backend.to_str())
        except Exception:  # a tokenizer that cannot serialise itself: not one this module knows
            return None
        post, model, norm = spec.get("post_processor"), spec.get("model") or {}, spec.get("normalizer")
        if norm is not None and not (set(norm) == {"type"} and norm["type"] in IDENTITY_ON_ASCII):
            return None
        pattern = split_pattern(spec.get("pre_tokenizer") or {})
        if pattern is None:
            return None
        posts = (post.get("processors") or []) if post is not None and post.get("type") == "Sequence" else [post]
        if not all(p is None or p.get("type") == "TemplateProcessing"
                   or (p.get("type") == "ByteLevel" and not p.get("trim_offsets")) for p in posts):
            return None  # a post-processor that may trim offsets
        if model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0):
            return None
        added = {}
        for tid, tok in backend.get_added_tokens_decoder().items():
            if tok.lstrip or tok.rstrip or tok.single_word or not tok.content:
                return None
            added[tok.content] = (tid, bool(tok.normalized))
        return cls(backend, added, pattern)

    def _pieces(self, text: str) -> list[str]:
        """``text`` cut at its added tokens: text, token, text, token, ..., text (odd positions are added tokens)."""
        parts = self.split_raw.split(text) if self.split_raw is not None else [text]
        if self.split_norm is None:
            return parts
        out: list[str] = []  # each part's own split has odd length, so the alternation holds
        for k, part in enumerate(parts):
            out.extend([part] if k % 2 else self.split_norm.split(part))
        return out

    def _word_ids(self, word: str) -> tuple[int, ...] | None:
        """A word's ids, from the cache, else through the model (then cached with its tokens' lengths); None when
        the model cannot cover the word (an unknown token)."""
        ids = self.ids_of.get(word)
        if ids is not None:
            return ids
        mapped = word.translate(BYTE_LEVEL)
        tokens = self.model.tokenize(mapped)
        if "".join(t.value for t in tokens) != mapped:  # an unknown token: not handled
            return None
        lens = tuple(len(t.value) for t in tokens)
        ids = tuple(t.id for t in tokens)
        self.ids_of[word] = ids
        self.lens_of[word] = lens
        return ids

    def _chunk(self, chunk: str, cache: dict[str, tuple[int, ...]], key: str) -> tuple[int, ...] | None:
        """The ids of a space-delimited chunk (its words', in order), cached under ``key``."""
        out: list[int] = []
        get, word_ids = self.ids_of.get, self._word_ids
        for word in self.words(chunk):
            ids = get(word) or word_ids(word)  # a hit without a call (a word has at least one token)
            if ids is None:
                return None
            out += ids
        cache[key] = ids = tuple(out)
        return ids

    def _clear_if_full(self) -> None:
        if len(self.ids_of) + len(self.first_of) + len(self.spaced_of) >= MAX_WORDS:
            for d in (self.ids_of, self.lens_of, self.first_of, self.spaced_of):
                d.clear()

    def ids(self, text: str) -> list[int] | None:
        """The ids ``backend.encode(text, add_special_tokens=False)`` gives, or None when the text is not handled.

        A piece without a space next to another white-space character is cut at its spaces: no word of the three
        patterns crosses the point before such a space (a word holds a space only as its first character, or inside
        a run of white space) and none reads past it (the word before ends in a non-space, and the patterns look
        ahead only after white space), so ``" " + chunk`` has the words it has in context; chunks are cached like
        words. Under Llama-3's and Qwen2's patterns a letter word may also start on punctuation or a tab
        (``[^\\r\\n\\p{L}\\p{N}]?\\p{L}+``): that character is inside the chunk, so the cut holds. Other pieces are
        split into words."""
        if not text.isascii():
            return None
        self._clear_if_full()
        out: list[int] = []
        first_get, spaced_get = self.first_of.get, self.spaced_of.get
        for k, part in enumerate(self._pieces(text)):
            if k % 2:
                out.append(self.added[part])
                continue
            if not part:
                continue
            if b"  " not in part.encode("ascii").translate(WS_TO_SPACE):
                chunks = part.split(" ")
                ids = first_get(chunks[0])
                if ids is None:
                    ids = self._chunk(chunks[0], self.first_of, chunks[0])
                    if ids is None:
                        return None
                out += ids
                for chunk in chunks[1:]:
                    ids = spaced_get(chunk)
                    if ids is None:
                        ids = self._chunk(" " + chunk, self.spaced_of, chunk)
                        if ids is None:
                            return None
                    out += ids
                continue
            get, word_ids = self.ids_of.get, self._word_ids
            for word in self.words(part):
                ids = get(word) or word_ids(word)
                if ids is None:
                    return None
                out += ids
        return out

    def ids_offsets(self, text: str) -> tuple[list[int], Iterator[tuple[int, int]]] | None:
        """The ids and character offsets the backend gives, or None when the text is not handled. The offsets come
        as an iterator, made as they are read (the index reads them up to the first supervised token)."""
        if not text.isascii():
            return None
        self._clear_if_full()
        ids: list[int] = []
        spans: list[tuple[int, ...] | int] = []  # per word its tokens' character counts; an added token: its length
        get, word_ids, lens_of, words = self.ids_of.get, self._word_ids, self.lens_of, self.words
        for k, part in enumerate(self._pieces(text)):
            if k % 2:
                ids.append(self.added[part])
                spans.append(len(part))
                continue
            for word in words(part):
                these = get(word) or word_ids(word)
                if these is None:
                    return None
                ids += these
                spans.append(lens_of[word])
        return ids, _offsets(spans)


def _offsets(spans: list[tuple[int, ...] | int]) -> Iterator[tuple[int, int]]:
    pos = 0
    for span in spans:
        if isinstance(span, int):
            yield pos, pos + span
            pos += span
            continue
        for n in span:
            yield pos, pos + n
            pos += n
