"""`llava demo --dpo True` at a reduced size: DPO must move held-out pairwise accuracy from ~50% to >= 90%.

    .venv/bin/pytest tests/demo/test_preference_demo.py      # slow: an SFT and a DPO run of the tiny models

The SFT answers ignore the instruction (lower case / capital letter, 50/50 under each), so the SFT model prefers the
same form under both instructions: about 50% on the held-out pairs, whose instructions are balanced, by construction.
"""

from __future__ import annotations

import pytest

from llava.demo.preference_demo import answer_form, answer_in, run_dpo_demo


def test_answer_forms():
    assert (answer_in("lower", "red"), answer_in("capital", "red")) == ("red", "Red")
    assert [answer_form(t) for t in ("red", " Red", "RED", "red red", "")] == [
        "lower", "capital", "other", "other", "other"]


@pytest.mark.slow
def test_dpo_moves_heldout_pairwise_accuracy_and_greedy_answers(tmp_path):
    result = run_dpo_demo(tmp_path, n_train=64, n_heldout=12, sft_epochs=5, dpo_epochs=6, batch_size=8,
                          controls=False, quiet=True)
    sft, dpo = result["held_out"].values()
    assert 0.3 <= sft["pairwise accuracy"] <= 0.7, sft
    assert dpo["pairwise accuracy"] >= 0.9, dpo
    assert dpo["mean margin (nats)"] > sft["mean margin (nats)"] + 0.5
    assert dpo["greedy follows instruction"] >= sft["greedy follows instruction"] + 0.3, (sft, dpo)
