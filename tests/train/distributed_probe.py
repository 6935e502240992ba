"""Training entry point for the multi-process tests: ``llava.train.train`` plus what each rank saw and held.

    deepspeed --num_gpus 2 tests/train/distributed_probe.py <training flags>     # or: torchrun --nproc_per_node 2

Every rank writes ``<output_dir>/probe_rank<R>.json``:
  ``rank``/``world_size`` (accelerate's, as the Trainer uses them) next to the launcher's ``RANK``/``WORLD_SIZE``;
  ``seen``: the dataset indices this rank fetched, in order (micro-batch k is ``seen[k*b:(k+1)*b]``);
  under ZeRO-3, ``partitioned``: for large weights, the local ``numel()`` outside a gather and the full size;
  ``projector_equals_saved``: the gathered projector vs the ``mm_projector.safetensors`` written (stage 1).

The tests of a model kind under ZeRO-3 share :func:`assert_zero3_two_ranks_match_one_process` (anyres, video).
"""

from __future__ import annotations

import json
import os
import sys

import torch

from llava.data.dataset import LazySupervisedDataset
from llava.train.distributed import finish_distributed_process
from llava.train.train import train
from llava.train.zero3_gather import gather_named_parameters, is_zero3_partitioned

SEEN: list[int] = []
_getitem = LazySupervisedDataset.__getitem__


def _recording_getitem(self, index):
    SEEN.append(int(index))
    return _getitem(self, index)


def main() -> None:
    LazySupervisedDataset.__getitem__ = _recording_getitem
    trainer = train(sys.argv[1:])
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    probe = {
        "rank": args.process_index,
        "world_size": args.world_size,
        "env_rank": int(os.environ["RANK"]),
        "env_world_size": int(os.environ["WORLD_SIZE"]),
        "per_device_batch": args.per_device_train_batch_size,
        "seen": SEEN,
    }
    watched = {
        "projector.linear_2.weight": base.model.multi_modal_projector.linear_2.weight,
        "language_model.layers.0.self_attn.q_proj.weight": base.model.language_model.layers[0].self_attn.q_proj.weight,
    }
    if any(is_zero3_partitioned(p) for p in watched.values()):
        probe["partitioned"] = {n: {"local_numel": p.numel(), "full_numel": int(p.ds_numel)} for n, p in watched.items()}
    projector_file = os.path.join(args.output_dir, "mm_projector.safetensors")
    if trainer.projector_only:
        gathered = gather_named_parameters(base.model.multi_modal_projector.named_parameters())  # every rank joins
        if args.process_index == 0:
            from safetensors.torch import load_file

            saved = load_file(projector_file)
            probe["projector_equals_saved"] = sorted(saved) == sorted(gathered) and all(
                torch.equal(saved[k], gathered[k]) for k in saved
            )
            probe["gathered_numel"] = {k: v.numel() for k, v in gathered.items()}
    with open(os.path.join(args.output_dir, f"probe_rank{args.process_index}.json"), "w") as f:
        json.dump(probe, f)
    finish_distributed_process()


def assert_zero3_two_ranks_match_one_process(flags, out, single_out, native_cls, **launch) -> None:
    """``flags(out_dir, batch)`` (training flags) under ZeRO-3 in 2 processes x batch 2 give the per-step losses of 1
    process x batch 4 (1e-5); the saved checkpoint has no empty ZeRO-3 shard and loads as ``native_cls`` with a
    trained ``image_newline``; a resumed run repeats the losses. ``launch``: the launcher's options (``timeout``)."""
    from test_distributed import REPO, assert_no_zero_size_tensors, assert_resumes_exactly, deepspeed, step_losses

    probe = str(REPO / "tests" / "train" / "distributed_probe.py")
    zero3 = ["--deepspeed", str(REPO / "zero_configs" / "zero3.json")]
    deepspeed([probe], [*zero3, *flags(out, 2)], **launch)
    single = train([*flags(single_out, 4), "--use_cpu", "True"])
    reference = {e["step"]: e["loss"] for e in single.state.log_history if "loss" in e}
    losses = step_losses(out)
    assert sorted(losses) == [1, 2, 3, 4]
    for step, loss in losses.items():
        assert abs(loss - reference[step]) <= 1e-5, (step, loss, reference[step])
    assert_no_zero_size_tensors(out)
    model = native_cls.from_pretrained(out)
    assert model.model.image_newline.abs().sum() > 0
    assert_resumes_exactly(out, lambda: deepspeed([probe], [*zero3, *flags(out, 2), "--resume_from_checkpoint", "True"],
                                                  **launch))


if __name__ == "__main__":
    main()
