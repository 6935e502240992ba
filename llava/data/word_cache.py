"""Exact ids (and offsets) of a GPT-2-style byte-level BPE tokenizer, each word's tokens computed once and cached.

    encoder = WordCacheEncoder.for_tokenizer(tokenizer)     # None unless the tokenizer is of the kind below
    encoder.ids(text)              # == backend.encode(text, add_special_tokens=False).ids, or None (not handled)
    encoder.ids_offsets(text)      # (ids, an iterator of the offsets) as the backend gives them, or None

What the Rust tokenizer does with a text, when its pipeline is: no normalizer, the ``ByteLevel`` pre-tokenizer with
GPT-2's split pattern (``use_regex``, no prefix space), a deterministic model (BPE without dropout), no
post-processor that moves offsets, added tokens matched as written (no ``lstrip``/``rstrip``/``single_word``):

1. the added tokens are cut out of the text first, leftmost-longest (those matched before normalisation, then the
   ``normalized`` ones in what is left);
2. each piece between them is split into words by GPT-2's pattern;
3. each word's bytes, mapped to the byte-level alphabet, go through the model alone.

The ids of a text are therefore its added tokens' ids and its words' ids, in order, and a word's ids do not depend on
its neighbours: they are computed once (``model.tokenize``) and looked up afterwards. Steps 1 and 2 are done here
with Python's ``re``; the pattern's Unicode classes (``\\p{L}``, ``\\p{N}``, ``\\s``) are written out for ASCII, so a
text is handled only when it is ASCII; any other text returns None and goes to the tokenizer itself.
``tests/data/test_word_cache.py`` holds the results equal to the backend's on the benchmark mix's rendered texts and
on random texts made of what the pattern treats differently (contractions, digits, punctuation, control characters,
runs of white space, added tokens and their fragments).
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


class WordCacheEncoder:
    """See the module docstring. Built by :meth:`for_tokenizer`, which checks the pipeline."""

    def __init__(self, backend, added: dict[str, tuple[int, bool]]):
        self.model = backend.model
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
        pre, post, model = spec.get("pre_tokenizer") or {}, spec.get("post_processor"), spec.get("model") or {}
        if spec.get("normalizer") is not None:
            return None
        if not (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")):
            return None
        if post is not None and post.get("type") != "TemplateProcessing" and not (
                post.get("type") == "ByteLevel" and not post.get("trim_offsets")):
            return None  # a post-processor that may trim offsets
        if model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0):
            return None
        added = {}
        for tid, tok in backend.get_added_tokens_decoder().items():
            if tok.lstrip or tok.rstrip or tok.single_word or not tok.content:
                return None
            added[tok.content] = (tid, bool(tok.normalized))
        return cls(backend, added)

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
        for word in GPT2_ASCII.findall(chunk):
            ids = self._word_ids(word)
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

        A piece without a space next to another white-space character is cut at its spaces: no word of the pattern
        crosses the point before such a space (a word holds a space only as its first character) and none reads past
        it (the word before ends in a non-space), so ``" " + chunk`` has the words it has in context; chunks are
        cached like words. Other pieces are split into words."""
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
            word_ids = self._word_ids
            for word in GPT2_ASCII.findall(part):
                ids = word_ids(word)
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
        word_ids, lens_of = self._word_ids, self.lens_of
        for k, part in enumerate(self._pieces(text)):
            if k % 2:
                ids.append(self.added[part])
                spans.append(len(part))
                continue
            for word in GPT2_ASCII.findall(part):
                these = word_ids(word)
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
