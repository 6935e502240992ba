"""``scripts/bench_sp_memory.py``'s ``--fit_budget`` search and its ``--head`` option (not a memory assertion).

The search is checked against the answer computed directly for a known peak function (one probe per call, as the
script makes one process per probe); ``--head stock`` and the supervised head give the same loss on one step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_sp_memory  # noqa: E402


@pytest.mark.parametrize("budget", [50.0, 299.0, 300.0, 1000.0, 4099.0])
def test_longest_within_finds_the_longest_fitting_multiple(monkeypatch, budget):
    def peak(seq: int) -> float:  # monotonic: 20 MiB fixed plus 0.25 MiB per token
        return 20 + seq / 4

    probed = []

    def fake_launch(sp, args):
        probed.append(args.seq)
        return {"tokens": args.seq, "step_peak_mib": peak(args.seq)}

    monkeypatch.setattr(bench_sp_memory, "launch", fake_launch)
    step = 128
    longest, probes = bench_sp_memory.longest_within(budget, step, argparse.Namespace(seq=0))
    expected = max((n for n in range(0, 100_000, step) if peak(n) <= budget), default=0)
    assert longest == expected, (budget, longest, expected, probed)
    assert [p["tokens"] for p in probes] == probed
    assert len(probed) == len(set(probed))  # no length probed twice


def test_stock_and_supervised_head_give_the_same_loss(capsys):
    losses = {}
    for head in ("stock", "supervised"):
        bench_sp_memory.main(["--rank-of", "1", "--seq", "256", "--layers", "1", "--width", "32", "--intermediate",
                              "64", "--head", head])
        losses[head] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]
    assert abs(losses["stock"] - losses["supervised"]) <= 1e-5, losses
