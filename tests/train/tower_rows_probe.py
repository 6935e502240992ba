"""``distributed_probe.py`` plus the rows each vision-tower call encoded on this rank (CLIP towers).

    deepspeed --num_gpus 2 tests/train/tower_rows_probe.py <training flags>

Every rank also writes ``<output_dir>/tower_rows_rank<R>.json``: the batch size (images, anyres crops or video
frames) of each call of the tower's patch embedding, in order. :func:`record_tower_rows` counts the same in-process.
"""

from __future__ import annotations

import atexit
import json
import os
import sys

from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings


def record_tower_rows(rows: list[int]):
    """Append the rows of every CLIP vision-embedding call to ``rows``; returns the undo."""
    forward = CLIPVisionEmbeddings.forward

    def counting(self, pixel_values, *args, **kwargs):
        rows.append(int(pixel_values.shape[0]))
        return forward(self, pixel_values, *args, **kwargs)

    CLIPVisionEmbeddings.forward = counting
    return lambda: setattr(CLIPVisionEmbeddings, "forward", forward)


def _output_dir(argv: list[str]) -> str:
    return argv[argv.index("--output_dir") + 1]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import distributed_probe

    ROWS: list[int] = []
    record_tower_rows(ROWS)
    path = os.path.join(_output_dir(sys.argv[1:]), f"tower_rows_rank{os.environ['RANK']}.json")
    atexit.register(lambda: open(path, "w").write(json.dumps(ROWS)))  # the probe ends the process (os._exit)
    distributed_probe.main()
