"""`llava demo --anyres True` at a reduced size: anyres must beat pad by >= 25 points where detail matters.

    .venv/bin/pytest tests/demo/test_anyres_demo.py      # slow: two short trainings of the tiny models

The patterns (1-pixel stripes, checker, plain) average to the same grey when downscaled to the tower's input, so
``pad`` is at chance (25%) by construction; anyres's crops see them. Blank images must be at chance for both (the
held-out set is balanced, so a model that ignores the image scores about 25%).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from llava.demo.fine_detail import PATTERNS, AnyresDemoConfig, draw_pattern, run_anyres_demo


def test_patterns_vanish_when_downscaled_to_the_tower_input():
    """The premise, checked on pixels: at 64 px every pattern is the same grey (within 2 levels inside the border)."""
    import random

    for side in (128, 192):
        small = {p: np.asarray(draw_pattern(p, side, side, random.Random(3)).resize((64, 64), Image.BICUBIC), float)
                 for p in PATTERNS}
        for p in PATTERNS:
            assert np.abs(small[p] - small["plain"])[4:-4, 4:-4].max() <= 2.0, (side, p)
        full = {p: np.asarray(draw_pattern(p, side, side, random.Random(3)), float) for p in PATTERNS}
        assert np.abs(full["horizontal"] - full["plain"]).mean() > 15  # at full resolution they differ


@pytest.mark.slow
def test_anyres_beats_pad_where_resolution_matters(tmp_path):
    results = run_anyres_demo(tmp_path, AnyresDemoConfig())  # the demo's defaults: 400 train, 120 held out, 4 epochs
    pad, anyres = (results[m]["accuracy"] for m in ("pad", "anyres"))
    assert anyres["anyres: real images"]["overall"] - pad["pad: real images"]["overall"] >= 0.25, results
    for mode, rows in (("pad", pad), ("anyres", anyres)):
        assert abs(rows[f"{mode}: blank images"]["overall"] - 0.25) <= 0.1, results
    assert results["anyres"]["tokens_per_sample"] > 2 * results["pad"]["tokens_per_sample"]  # measured 167 vs 59
