"""The index's work on one chunk of records: parse, render, one batched fast-tokenizer call, lengths and validation.

    result = index_records(raw_records, start, tokenizer, template, settings)   # settings: index.IndexSettings
    result["keep"], result["lengths"], result["has_image"], result["problems"], result["dropped"]

The outcome of every record is the one ``tokenize_conversation`` + ``record_image_problem`` give it one at a time
(``tests/data/test_index_batch.py`` holds the two equal), computed with less work per record:

- the rendered texts of the whole chunk go through the fast tokenizer in ONE call (``add_special_tokens=False``,
  offsets), as ``label_segments`` tokenizes each alone; the leading BOS enters as its id (``special_head``, once
  per chunk), the supervised characters are the same mask (``supervised_text``). With a byte-level BPE of
  GPT-2's, Llama-3's or Qwen2's split, ASCII texts get the same ids and offsets from ``word_cache`` (each word
  through the model once, then looked up: ~5x less CPU than the Rust call on the benchmark mix, its words cached);
- no label list is built: a sample's length is its ids plus the image tokens' expansion, truncated to
  ``model_max_length``; the position of the last image token and of the first supervised token decide the two
  rejections. A rejected sample is tokenized again by ``tokenize_conversation``, which raises the reference's own
  ``SampleRejected`` (kind and message), so its report is the reference's; so is any error the fast path does
  not expect (a placeholder/token count mismatch);
- image paths are checked with one ``lstat`` each (their directories resolved once per chunk). Anything but a
  regular file inside ``--image_folder`` under a plain name is checked again by ``record_image_problem``, whose
  verdict and message are then the record's. anyres records, whose image headers are read for their token
  counts (``read_image_sizes`` resolves every path), are not checked twice.
"""

from __future__ import annotations

import os
import stat
import time
from typing import Any

import numpy as np

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.data.anyres import read_image_sizes
from llava.data.images import ImageLoadError
from llava.data.records import RecordError, parse_record
from llava.data.tokenize import (
    SampleRejected,
    prepare_messages,
    special_head,
    supervised_text,
    tokenize_conversation,
)
from llava.data.validate import image_problem_kind, record_image_problem
from llava.data.video import VideoLoadError, probe_video, sample_frame_indices, video_messages
from llava.data.word_cache import WordCacheEncoder

TOKENIZE_BATCH = 256  # texts per tokenizer call: the call's overhead amortised, its encodings a few MiB at a time


def index_records(raws: list[Any], start: int, tokenizer, template, settings) -> dict[str, Any]:
    """Index ``raws`` (records ``start``, ``start + 1``, ...): the kept positions, their lengths and modality, and the
    problems (invalid records) and dropped samples (valid, cannot train) as ``(kind, message, record id)``."""
    s = settings
    images = _ImageChecker(s.image_folder)
    outcomes: list[tuple] = [()] * len(raws)  # per record: ("problem" | "dropped", entry) or ("keep", length, image)
    pending: list[tuple] = []  # (k, raw, record, head ids, text, segments after the head, placeholders,
    #                            (n_tokens, headers))
    bos_ids: dict[tuple[str, ...], list[int]] = {}
    dirs: set[str] = set()
    heads: set[str] = set()  # each image path's part up to its last "/": its directory's, joined once per chunk
    render = template.renderer_for(tokenizer)  # template.render_with_tokenizer(messages, tokenizer)
    for k, raw in enumerate(raws):
        i = start + k
        try:
            record = parse_record(raw, i)
        except RecordError as err:
            outcomes[k] = ("problem", (err.kind, str(err), err.record_id))
            continue
        if record.video is not None:  # video records: the per-record reference path (frames from metadata)
            outcomes[k] = index_video_record(record, tokenizer, template, s, dirs)
            continue
        if record.images and s.image_folder:
            heads.update(rel[: rel.rfind("/") + 1] for rel in record.images if isinstance(rel, str))
        n_tokens: int | list[int] = s.num_image_tokens
        headers_read = False
        if s.anyres is not None and record.images and (s.image_folder or _all_embedded(record.images)):
            try:  # anyres: each image's token count from its size (header read, no decode)
                n_tokens = s.anyres.record_image_tokens(read_image_sizes(s.image_folder, record.images))
                headers_read = True
            except ImageLoadError as err:
                outcomes[k] = ("problem", (image_problem_kind(err), f"record {record.id!r}: {err}", record.id))
                continue
        segments = render(prepare_messages(record.messages, template, s.mm_use_im_start_end))
        n_head = 0
        while n_head < len(segments) and segments[n_head].special:
            n_head += 1
        key = tuple(seg.text for seg in segments[:n_head])
        if key not in bos_ids or any(seg.special for seg in segments[n_head:]):
            bos_ids[key] = special_head(segments, tokenizer)[0]  # raises on a special segment after the head
        body = segments[n_head:]
        text = "".join([seg.text for seg in body])  # the mask (``supervised_text``) only where offsets are needed
        placeholders = sum([seg.text.count(DEFAULT_IMAGE_TOKEN) for seg in segments])
        pending.append((k, raw, record, bos_ids[key], text, body, placeholders, (n_tokens, headers_read)))
    # dirname(join(folder, rel)) depends on rel only up to its last "/" (where dirname cuts; with no "/" in rel, at
    # the separator join adds): the directories of a chunk's images from their distinct heads
    dirs.update(os.path.dirname(os.path.join(s.image_folder, head + "x")) for head in heads)
    tails = special_tails(tokenizer, s.image_token_id)

    def finish(p: tuple, length: int) -> None:
        k, _, record, *_, (_, headers_read) = p
        if record.images and not headers_read and not images.all_ok(record.images):
            problem = record_image_problem(record, s.image_folder)
            if problem is not None:
                outcomes[k] = ("problem", (*problem, record.id))
                return
        outcomes[k] = ("keep", length, bool(record.images))

    for b in range(0, len(pending), TOKENIZE_BATCH):
        batch = pending[b : b + TOKENIZE_BATCH]
        slow = []  # the records whose length needs the tokens' offsets
        ids_batch = _encode_ids(tokenizer, [p[4] for p in batch]) if tails else None
        for n, p in enumerate(batch):
            length = None if ids_batch is None else _plain_length(ids_batch[n], p, tails, s)
            if length is None:
                slow.append(p)
            else:
                finish(p, length)
        if not slow:
            continue
        ids_batch, offsets_batch = _encode_batch(tokenizer, [p[4] for p in slow])
        for p, ids, offsets in zip(slow, ids_batch, offsets_batch):
            k, raw, record, head, _, body, placeholders, (n_tokens, _) = p
            length = _sample_length(ids, offsets, head, supervised_text(body)[1], placeholders, n_tokens, s)
            if length is None:  # rejected, or not a case the fast path measures: the reference decides and words it
                try:
                    length = len(_reference_sample(record, n_tokens, tokenizer, template, s).input_ids)
                except SampleRejected as err:
                    rid = _rid(raw, start + k)
                    outcomes[k] = ("dropped", (err.kind, f"record {rid!r}: {err}", rid))
                    continue
            finish(p, length)
    keep, lengths, has_image, has_video, problems, dropped = [], [], [], [], [], []
    rows: dict[str, list[int]] = {"problem": [], "dropped": []}  # the record position of each problem / dropped entry
    for k, outcome in enumerate(outcomes):
        if outcome[0] == "keep":
            keep.append(start + k)
            lengths.append(outcome[1])
            has_image.append(outcome[2])
            has_video.append(len(outcome) > 3 and outcome[3])
        else:
            (problems if outcome[0] == "problem" else dropped).append(outcome[1])
            rows[outcome[0]].append(start + k)
    return {"keep": np.asarray(keep, np.int64), "lengths": np.asarray(lengths, np.int32),
            "has_image": np.asarray(has_image, bool), "has_video": np.asarray(has_video, bool), "problems": problems,
            "dropped": dropped, "image_dirs": dirs,
            "problem_rows": np.asarray(rows["problem"], np.int64), "dropped_rows": np.asarray(rows["dropped"], np.int64)}


def special_tails(tokenizer, image_token_id: int) -> dict[str, int]:
    """The tokenizer's special added tokens matched in the raw text (``special``, not ``normalized``) by content,
    longest first, the image token left out; empty when the tokenizer has no Rust backend."""
    if getattr(tokenizer, "_tokenizer", None) is None:
        return {}
    found = {t.content: i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
             if t.special and not t.normalized and t.content and i != image_token_id}
    return dict(sorted(found.items(), key=lambda x: -len(x[0])))


def _plain_length(ids: list[int], p: tuple, tails: dict[str, int], s) -> int | None:
    """The length of a sample that ends in a supervised special token (``</s>``, ``<|eot_id|>``) and is not
    truncated, from its ids alone (no offsets): the special token is split out of the raw text before anything
    else, so when the text ends with it and the last id is its id, that token covers the text's last character,
    which is supervised (``_ends_supervised``): the sample has a supervised token, and no truncation can remove it.
    None when that is not proven (then ``_sample_length`` decides with offsets)."""
    _, _, _, head, text, body, placeholders, (n_tokens, _) = p
    if not ids or not _ends_supervised(body):
        return None
    tid = ids[-1]
    for content, tail_id in tails.items():
        if tail_id == tid and text.endswith(content):
            break
    else:
        return None
    image_id = s.image_token_id
    found = ids.count(image_id)
    if found != placeholders or image_id in head:
        return None
    if isinstance(n_tokens, int):
        if found and n_tokens < 1:
            return None
        extra = found * (n_tokens - 1)
    else:
        if len(n_tokens) != found or any(c < 1 for c in n_tokens):
            return None
        extra = sum(n_tokens) - found
    total = len(head) + len(ids) + extra
    return total if total <= s.model_max_length else None


def _ends_supervised(segments) -> bool:
    """Whether the last character of the joined text is supervised (``supervised_text``'s mask ends in a 1): the last
    segment with text is supervised and not all white space (its mask runs from its first non-space to its end)."""
    for seg in reversed(segments):
        if seg.text:
            return seg.supervised and not seg.text.isspace()
    return False


def _encode_ids(tokenizer, texts: list[str]) -> list[list[int]] | None:
    """Ids only (no offsets) through the Rust backend when it neither truncates nor pads (``word_cache``'s per-word
    lookups where it applies, else ``encode_batch_fast``); None otherwise."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return _routed(backend, "ids", texts, lambda rest: [e.ids for e in encode(rest, add_special_tokens=False)])


def _routed(backend, kind: str, texts: list[str], rust) -> list:
    """The results of ``texts``: the word cache's (its method ``kind``, ``ids`` or ``ids_offsets``) when that kind's
    ``Route`` picks the cache, and ``rust(rest)``'s for the rest (every text when it picks the Rust call, else those
    the cache hands back); the batch's CPU time is then recorded against the way taken."""
    encoder = word_encoder(backend)
    way = encoder.routes[kind].pick() if encoder is not None else "rust"
    start = time.process_time()
    out = list(map(getattr(encoder, kind), texts)) if way == "cache" else [None] * len(texts)
    rest = [k for k, got in enumerate(out) if got is None]
    if rest:
        for k, got in zip(rest, rust([texts[k] for k in rest])):
            out[k] = got
    if encoder is not None:
        encoder.routes[kind].measured(way, time.process_time() - start, sum(map(len, texts)))
    return out


class Route:
    """Which way a batch of texts is tokenized (one ``Route`` for ids alone, one for ids and offsets): through the
    word cache or the Rust call, whichever cost less CPU per character at its last measure (each measure averaged
    with the one before); the other way is measured again every ``PROBE``-th batch. The word cache pays while most
    words are found in it (the benchmark mix: ~5x less CPU); with every word new (a source of unique strings) it
    costs ~2x the Rust call. Both give the same ids.

    The first batch goes through the cache, which it fills. When its words are all new (a process whose first
    chunk is a small source), that measure is ~2x the Rust call's, and a warm measure averaged with it stays above
    the Rust call's until the second probe (128 batches). So the cache is measured again at the third batch, and
    that measure replaces its first."""

    PROBE = 64

    def __init__(self):
        self.cost: dict[str, float | None] = {"cache": None, "rust": None}  # CPU seconds per character
        self.measures = {"cache": 0, "rust": 0}
        self.batches = 0

    def pick(self) -> str:
        self.batches += 1
        cache, rust = self.cost["cache"], self.cost["rust"]
        if cache is None or rust is None:
            return "cache" if cache is None else "rust"
        if self.measures["cache"] == 1:  # measured only cold: measure it warm
            return "cache"
        best = "cache" if cache <= rust else "rust"
        if self.batches % self.PROBE == 0:
            return "rust" if best == "cache" else "cache"
        return best

    def measured(self, way: str, seconds: float, chars: int) -> None:
        if chars:
            old = self.cost[way]
            self.measures[way] += 1
            replace = old is None or (way == "cache" and self.measures[way] == 2)
            self.cost[way] = seconds / chars if replace else (old + seconds / chars) / 2


_ENCODER: list = [None, None, None]  # backend, what the encoder was built from, the encoder


def word_encoder(backend) -> WordCacheEncoder | None:
    """``word_cache``'s encoder of ``backend`` (its per-word cache kept across chunks), or None when the backend's
    pipeline is not one it handles. Built again when the backend object, its added tokens or its pipeline's
    small parts (normaliser, pre-tokenizer, post-processor, vocabulary size) changed."""
    stamp = (sorted((i, str(t)) for i, t in backend.get_added_tokens_decoder().items()),
             [getattr(c, "__getstate__", lambda: None)() if c is not None else None
              for c in (backend.normalizer, backend.pre_tokenizer, backend.post_processor)],
             backend.get_vocab_size(with_added_tokens=False), getattr(backend, "encode_special_tokens", None))
    if _ENCODER[0] is not backend or _ENCODER[1] != stamp:
        encoder = WordCacheEncoder.for_tokenizer(backend)
        if encoder is not None:
            encoder.routes = {"ids": Route(), "ids_offsets": Route()}  # each method's own costs
        _ENCODER[:] = [backend, stamp, encoder]
    return _ENCODER[2]


def _sample_length(ids: list[int], offsets: list[tuple[int, int]], head: list[int], mask: bytearray, placeholders: int,
                   n_tokens: int | list[int], s) -> int | None:
    """The sample's length as ``tokenize_conversation`` makes it (the ``head`` ids (BOS) + ``ids``, each image token
    expanded to its count, truncated to ``model_max_length``), or None when it rejects the sample or the case is not
    a plain one (placeholder / image-token / count mismatch)."""
    image_id = s.image_token_id
    if image_id in head:
        return None
    positions = []
    p = -1
    try:
        while True:
            p = ids.index(image_id, p + 1)
            positions.append(p)
    except ValueError:
        pass
    counts = [n_tokens] * len(positions) if isinstance(n_tokens, int) else list(n_tokens)
    if len(positions) != placeholders or len(counts) != len(positions) or any(c < 1 for c in counts):
        return None
    n_head = len(head)
    extra = sum(counts) - len(counts)  # tokens the expansion adds
    total = n_head + len(ids) + extra
    cutoff = total
    if total > s.model_max_length:
        if positions and n_head + positions[-1] + extra >= s.model_max_length:  # the last image token's position
            return None
        cutoff = s.model_max_length
    first = mask.find(1)  # no token ending at or before it can cover a supervised character
    if first < 0:
        return None
    for q, (a, b) in enumerate(offsets):
        if b > first and mask.find(1, a, b) >= 0 and ids[q] != image_id:
            break
    else:
        return None
    before = sum(c - 1 for pos, c in zip(positions, counts) if pos < q)
    return cutoff if n_head + q + before < cutoff else None


def _reference_sample(record, n_tokens, tokenizer, template, s):
    return tokenize_conversation(record.messages, template, tokenizer, image_token_id=s.image_token_id,
                                 num_image_tokens=n_tokens, model_max_length=s.model_max_length,
                                 mm_use_im_start_end=s.mm_use_im_start_end)


def _encode_batch(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Ids and character offsets of each text (no special tokens added): the fast tokenizer's Rust backend called
    directly when it neither truncates nor pads (the call ``tokenizer(texts, add_special_tokens=False)`` makes, minus
    transformers' per-encoding conversion, ~10% of the index's CPU); else through ``tokenizer(...)`` itself."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        done = _routed(backend, "ids_offsets", texts, lambda rest: [
            (e.ids, e.offsets) for e in backend.encode_batch(rest, add_special_tokens=False)])
        return [d[0] for d in done], [d[1] for d in done]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                        return_token_type_ids=False)
    return encoded["input_ids"], encoded["offset_mapping"]


def _all_embedded(images: list) -> bool:
    return not any(isinstance(ref, str) for ref in images)


def _rid(raw: Any, index: int) -> str:
    return str(raw.get("id")) if isinstance(raw, dict) and raw.get("id") is not None else f"#{index}"


class _ImageChecker:
    """``all_ok(paths)``: True only when ``resolve_image_path`` accepts every path (a regular file, reached without a
    symlink in its last component, in a directory that resolves inside the folder). False means "ask
    ``record_image_problem``", not "bad"."""

    def __init__(self, image_folder: str | None):
        self.folder = os.path.realpath(image_folder) if image_folder else None
        if self.folder is not None and not os.path.isdir(self.folder):
            self.folder = None
        self.dirs: dict[str, str | None] = {}  # relative directory -> its real path when inside the folder

    def all_ok(self, paths: list[str]) -> bool:
        if self.folder is None:
            return False
        for rel in paths:
            if not isinstance(rel, str):  # embedded bytes: record_image_problem reads their header
                return False
            if not rel or "\0" in rel or rel[0] in "/\\" or rel[1:2] == ":":  # absolute, drive, UNC: the slow check
                return False
            directory, name = os.path.split(rel)  # "", "." or ".." as name: not a regular file below
            real = self.dirs.get(directory, "")
            if real == "":
                real = os.path.realpath(os.path.join(self.folder, directory))
                real = real if real == self.folder or real.startswith(self.folder.rstrip(os.sep) + os.sep) else None
                self.dirs[directory] = real
            if real is None:
                return False
            try:
                if not stat.S_ISREG(os.lstat(os.path.join(real, name)).st_mode):
                    return False
            except OSError:
                return False
        return True


def index_video_record(record, tokenizer, template, s, dirs: set[str]) -> tuple:
    """The outcome of a record with a video: its frame count from the container's metadata (no decoding), its images
    checked, the conversation (with ``--add_time_instruction``'s sentence) tokenized with the video's exact token
    count. A video that cannot be used is a problem named ``video_<kind>``."""
    if s.video is None or s.video_folder is None:
        return ("problem", ("video_not_enabled", f"record {record.id!r} has a video but --video_folder is not set "
                            f"(video training needs it)", record.id))
    try:
        info = probe_video(s.video_folder, record.video)
    except VideoLoadError as err:
        return ("problem", (f"video_{err.kind}", f"record {record.id!r}: {err}", record.id))
    dirs.add(os.path.dirname(os.path.join(s.video_folder, record.video.rstrip("/"))))
    n_image_tokens: int | list[int] = s.num_image_tokens
    if record.images:
        problem = record_image_problem(record, s.image_folder)
        if problem is not None:
            return ("problem", (*problem, record.id))
        if s.anyres is not None:
            try:
                n_image_tokens = s.anyres.record_image_tokens(read_image_sizes(s.image_folder, record.images))
            except ImageLoadError as err:
                return ("problem", (image_problem_kind(err), f"record {record.id!r}: {err}", record.id))
    indices = sample_frame_indices(info.frames, info.fps, s.video.sampling)
    messages = video_messages(record.messages, info, indices, s.video)
    try:
        sample = tokenize_conversation(messages, template, tokenizer, image_token_id=s.image_token_id,
                                       num_image_tokens=n_image_tokens, model_max_length=s.model_max_length,
                                       mm_use_im_start_end=s.mm_use_im_start_end, video_token_id=s.video_token_id,
                                       num_video_tokens=s.video.video_tokens(len(indices)))
    except SampleRejected as err:
        return ("dropped", (err.kind, f"record {record.id!r}: {err}", record.id))
    return ("keep", len(sample.input_ids), bool(record.images), True)  # has_image: its own images (besides the video)
