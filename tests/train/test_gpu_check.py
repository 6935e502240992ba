"""``scripts/gpu_check.py`` (the prepared GPU check of issue #25) runs its CPU path: tiny shape, one step per variant.

    WANDB_MODE=offline HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/train/test_gpu_check.py

Packed and padded batches of the same samples must give the same supervised-head loss (the padded collator and the
per-sample attention are held exactly elsewhere; here it shows the script feeds both layouts the same data).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def test_gpu_check_dry_run_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    results = gpu_check.main(["--device", "cpu", "--dry_run"])
    by = {r["variant"]: r for r in results}
    assert set(by) == {"sdpa_padded", "sdpa_packed"}  # no flash_attn / liger / second GPU on CPU
    assert abs(by["sdpa_packed"]["mean_loss"] - by["sdpa_padded"]["mean_loss"]) < 1e-3
    for r in results:
        assert r["shape"] == "tiny" and r["step_time_median_s"] > 0 and r["real_tokens_per_s"] > 0
    assert "sdpa_packed/sdpa_padded" in capsys.readouterr().out
