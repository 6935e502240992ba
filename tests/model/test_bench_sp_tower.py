"""``scripts/bench_sp_tower.py`` on a tiny tower: what it reports per mode is what each rank ran.

Five frames over 2 ranks: in ``all`` mode each rank's tower encodes the 5, in ``share`` mode 3 (the last share padded
with a copy), the tower FLOPs follow the rows (3/5 per rank), and the two modes' losses are the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_sp_tower  # noqa: E402


def test_share_mode_encodes_each_ranks_rows_only():
    lines = bench_sp_tower.main(["--frames", "5", "--steps", "1", "--image_size", "32", "--patch", "8",
                                 "--tower_width", "64", "--tower_layers", "1"])
    *ranks, ratio = lines
    assert [(x["mode"], x["tower_rows"]) for x in ranks] == [("all", 5), ("all", 5), ("share", 3), ("share", 3)]
    assert ratio["tower_rows_share_over_all"] == 0.6
    for part in ("tower", "projector"):  # FLOPs per row: every frame the same size
        assert ratio[f"{part}_flops_share_over_all"] == pytest.approx(0.6, abs=0.01), part
    assert ratio["loss_all"] == pytest.approx(ratio["loss_share"], abs=1e-5)
