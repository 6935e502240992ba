"""Throughput accounting for ``scripts/bench_train.py``: useful FLOPs, the machine's matmul peak, and where a step's
time goes (a profile grouped by model component).

    peak = matmul_peak_flops()                     # FLOP/s of a large fp32 matmul on this machine
    counts = FlopCounts.of(model)                  # parameter counts and shapes that the formula needs
    useful = counts.step_flops(sample_lengths(batch, pad_id), n_images)   # FLOPs of one step's real tokens
    table = profile_step_by_component(model, run_step)                    # {component: ms}

FLOP formula (documented here, used by every figure): per sample of T real tokens, with N_lm the language model's
matmul parameters (every linear of every layer plus ``lm_head``; the input embedding is a lookup, not a matmul),
L layers of width d,

    LM      = k_lm * (N_lm * T + 2 * L * d * T**2)     k_lm = 6 if the LM's weights train (forward 2, backward 4),
                                                        4 if they are frozen but gradients flow (LoRA), 2 if neither
    vision  = k_v * n_images * (N_v * P + 2 * L_v * d_v * P**2)   P = patches (+CLS), k_v = 2 when the tower is frozen
    projector = 6 * N_proj * n_image_tokens

``2 * L * d * T**2`` is the attention score and value matmuls (forward, QK^T and AV over the full square, as in the
PaLM appendix). Only real tokens count: padding and the masked-out blocks of a packed row are waste, not work, so
MFU measures useful work against the peak.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from llava.constants import HAS_CLS_TOKEN


def matmul_peak_flops(n: int = 2048, reps: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of the best of ``reps`` ``n x n`` matmuls (the machine's achievable peak for this dtype and threads)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def sample_lengths(batch: dict[str, torch.Tensor], pad_token_id: int) -> list[int]:
    """Real token count of every sample in a padded batch (``attention_mask``) or a packed one (``position_ids``
    runs; a row's trailing run of pad tokens is padding)."""
    if "attention_mask" in batch:
        return [int(n) for n in batch["attention_mask"].sum(-1)]
    lengths = []
    for ids, pos in zip(batch["input_ids"], batch["position_ids"]):
        starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
        for k, (a, b) in enumerate(zip(starts, starts[1:])):
            if k > 0 and b == len(pos) and bool((ids[a:b] == pad_token_id).all()):
                break
            lengths.append(b - a)
    return lengths


def _matmul_params(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


@dataclass
class FlopCounts:
    n_lm: int
    lm_layers: int
    lm_width: int
    k_lm: int
    n_vision: int
    vision_layers: int
    vision_width: int
    patches: int
    k_vision: int
    n_projector: int
    image_tokens: int

    @classmethod
    def of(cls, model, image_tokens: int) -> FlopCounts:
        """Counts from a (possibly PEFT-wrapped) ``LlavaForConditionalGeneration``."""
        llava = model.get_base_model() if hasattr(model, "get_base_model") else model
        lm, tower = llava.model.language_model, llava.model.vision_tower
        projector = llava.model.multi_modal_projector
        lm_trains = any(p.requires_grad for n, p in lm.named_parameters() if "lora_" not in n)
        lora = any("lora_" in n for n, _ in lm.named_parameters())
        vcfg, tcfg = llava.config.vision_config, llava.config.text_config
        patches = (vcfg.image_size // vcfg.patch_size) ** 2 + int(vcfg.model_type in HAS_CLS_TOKEN)
        return cls(
            n_lm=_matmul_params(lm) + llava.lm_head.weight.numel(),
            lm_layers=tcfg.num_hidden_layers,
            lm_width=tcfg.hidden_size,
            k_lm=6 if lm_trains else (4 if lora or any(p.requires_grad for p in projector.parameters()) else 2),
            n_vision=_matmul_params(tower),
            vision_layers=vcfg.num_hidden_layers,
            vision_width=vcfg.hidden_size,
            patches=patches,
            k_vision=6 if any(p.requires_grad for p in tower.parameters()) else 2,
            n_projector=_matmul_params(projector),
            image_tokens=image_tokens,
        )

    def step_flops(self, lengths: list[int], n_images: int) -> float:
        lm = sum(self.n_lm * t + 2 * self.lm_layers * self.lm_width * t * t for t in lengths) * self.k_lm
        per_image = self.n_vision * self.patches + 2 * self.vision_layers * self.vision_width * self.patches**2
        return lm + self.k_vision * n_images * per_image + 6 * self.n_projector * self.image_tokens * n_images


COMPONENTS = ("vision_tower", "projector", "attention", "mlp", "norms+embed+rope", "lm_head+loss", "optimizer")


def _component_regions(llava) -> dict[torch.nn.Module, str]:
    regions = {llava.model.vision_tower: "vision_tower", llava.model.multi_modal_projector: "projector",
               llava.lm_head: "lm_head+loss"}
    for layer in llava.model.language_model.layers:
        regions[layer.self_attn] = "attention"
        regions[layer.mlp] = "mlp"
    return regions


def profile_step_by_component(model, run_step) -> dict[str, float]:
    """Milliseconds of one ``run_step()`` (forward, backward, optimizer) per component, from ``torch.profiler``.

    Forward ops are labelled by the innermost component module they run in (forward hooks open a
    ``record_function``); a backward op takes the label of the forward op it differentiates (matched by the
    autograd sequence number); ``Optimizer.step`` and ``zero_grad`` are the optimizer; the rest of the language
    model (embedding, norms, rotary, residual adds, mask building) is ``norms+embed+rope``; the loss, computed after
    ``lm_head``, is counted with it. Times are self CPU times, so nothing is counted twice.
    """

    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    handles, open_ranges = [], {}
    for module, label in _component_regions(llava).items():
        def pre(mod, args, label=label):
            open_ranges[id(mod)] = record_function(f"llava::{label}")
            open_ranges[id(mod)].__enter__()

        def post(mod, args, output):
            open_ranges.pop(id(mod)).__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_step()
    finally:
        for h in handles:
            h.remove()
    events = prof.events()
    label_of: dict[int, str] = {}
    for e in events:  # forward: innermost labelled ancestor
        parent, label = e.cpu_parent, None
        while parent is not None and label is None:
            if parent.name.startswith("llava::"):
                label = parent.name.removeprefix("llava::")
            parent = parent.cpu_parent
        if label and e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            label_of.setdefault(e.sequence_nr, label)
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith("llava::"):
            continue
        label, node = None, e
        while node is not None and label is None:
            if node.name.startswith("llava::"):
                label = node.name.removeprefix("llava::")
            elif node.name.startswith("autograd::engine::evaluate_function"):
                label = label_of.get(node.sequence_nr, "lm_head+loss" if "Loss" in node.name or "LogSoftmax" in
                                     node.name or "Nll" in node.name else "norms+embed+rope")
            elif node.name.startswith(("Optimizer.step", "Optimizer.zero_grad")):
                label = "optimizer"
            node = node.cpu_parent
        if label is None:
            label = "lm_head+loss" if any(k in e.name for k in ("cross_entropy", "log_softmax", "nll_loss")) \
                else "norms+embed+rope"
        totals[label] += e.self_cpu_time_total / 1000.0
    return {c: round(totals.get(c, 0.0), 1) for c in COMPONENTS}
