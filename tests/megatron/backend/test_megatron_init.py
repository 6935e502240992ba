"""Weights into the Megatron backend without any rank holding the whole model.

Run:  .venv/bin/pytest tests/megatron/backend/test_megatron_init.py -v      (~20 s; no megatron-core needed)

- ``compose_streaming`` (the starting checkpoint rank 0 writes) equals what the hf backend builds and saves
  (``build_llava_model`` after the same ``set_seed``: every tensor bit for bit, config, generation config,
  processor) for an LLM + CLIP / SigLIP tower (untied Llama, tied Qwen2), with ``--mm_use_im_start_end`` and a
  stage-1 projector file, and for a Llava checkpoint that needs tokens added -- while loading no model whole
  (``from_pretrained`` of the language model or the Llava model raises) and reading every LM tensor once;
- ``read_rank_state`` (what each rank loads) equals that rank's file of ``llava convert hf2mcore`` (whose layout
  ``test_megatron_layout.py`` checks by hand) at TP2 PP2, and reads from the checkpoint only the tensors of its own
  pipeline stage: nothing of the other stage, the vision tower and projector on the first stage only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from llava.megatron.backend.init_checkpoint import compose_streaming
from llava.model.builder import build_llava_model
from llava.model.model_args import ModelArguments
from llava.safetensors_io import SafetensorsReader


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def tied_qwen2(tiny_models, tmp_path_factory) -> Path:
    """A Qwen2-style LM with tied embeddings and q/k/v biases, with the demo tokenizer."""
    out = tmp_path_factory.mktemp("init_qwen2") / "qwen2"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_models["llm"])
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(3)
    transformers.Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def stage1_projector(tiny_models, tmp_path_factory) -> Path:
    """A stage-1 projector file (with the new start/end embeddings, as LLaVA's stage 1 saves them)."""
    from llava.model.projector import save_projector_state

    torch.manual_seed(7)
    built = build_llava_model(ModelArguments(model_name_or_path=str(tiny_models["llm"]),
                                             vision_tower=str(tiny_models["vision_tower"]), mm_use_im_start_end=True))
    state = {k: torch.randn_like(v) for k, v in built.model.model.multi_modal_projector.state_dict().items()}
    state["model.embed_tokens.weight"] = torch.randn_like(built.model.get_input_embeddings().weight)
    path = tmp_path_factory.mktemp("init_stage1") / "mm_projector.safetensors"
    save_projector_state(state, path)
    return path


@pytest.fixture(scope="module")
def llava_checkpoint(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("init_llava") / "llava"
    built = build_llava_model(ModelArguments(model_name_or_path=str(tiny_models["llm"]),
                                             vision_tower=str(tiny_models["vision_tower"])))
    built.model.save_pretrained(out)
    built.processor.save_pretrained(out)
    return out


CASES = {
    "llama_clip": lambda m, q, p, c: dict(model_name_or_path=m["llm"], vision_tower=m["vision_tower"]),
    "llama_start_end_stage1": lambda m, q, p, c: dict(model_name_or_path=m["llm"], vision_tower=m["vision_tower"],
                                                      mm_use_im_start_end=True, pretrain_mm_mlp_adapter=str(p)),
    "qwen2_tied_siglip": lambda m, q, p, c: dict(model_name_or_path=q, vision_tower=m["siglip_tower"]),
    "qwen2_tied_layer_-1": lambda m, q, p, c: dict(model_name_or_path=q, vision_tower=m["vision_tower"],
                                                   mm_vision_select_layer=-1),
    "llava_add_tokens": lambda m, q, p, c: dict(model_name_or_path=c, mm_use_im_start_end=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_composition_equals_the_hf_backend_build(case, tiny_models, tied_qwen2, stage1_projector,
                                                          llava_checkpoint, tmp_path, monkeypatch):
    kwargs = CASES[case](tiny_models, tied_qwen2, stage1_projector, llava_checkpoint)
    model_args = ModelArguments(**{k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()})
    transformers.set_seed(0)
    built = build_llava_model(model_args)
    built.model.save_pretrained(tmp_path / "hf")
    built.processor.save_pretrained(tmp_path / "hf")

    def refuse(*args, **kw):
        raise AssertionError("the composition loaded a whole model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", refuse)
    reads: list[str] = []
    get = SafetensorsReader.get
    monkeypatch.setattr(SafetensorsReader, "get", lambda self, name: reads.append(name) or get(self, name))
    transformers.set_seed(0)
    added = compose_streaming(model_args, tmp_path / "mg", torch.float32)
    monkeypatch.undo()

    assert added == built.added_tokens > 0
    expected, got = _tensors(tmp_path / "hf"), _tensors(tmp_path / "mg")
    assert sorted(got) == sorted(expected)
    differ = [k for k in expected if expected[k].dtype != got[k].dtype or not torch.equal(expected[k], got[k])]
    assert not differ, differ[:5]
    assert len(reads) == len(set(reads))  # every language-model tensor read once, straight to the output
    for name in ("config.json", "generation_config.json", "processor_config.json", "tokenizer_config.json"):
        a, b = (json.loads((tmp_path / side / name).read_text()) for side in ("hf", "mg"))
        assert a == b, name
    assert (tmp_path / "mg" / "tokenizer.json").read_text() == (tmp_path / "hf" / "tokenizer.json").read_text()


def test_each_rank_reads_only_its_own_stage(llava_checkpoint, tmp_path, monkeypatch):
    """TP2 x PP2: rank (tp, pp) gets exactly the converter's shard file, having read only
    stage pp's tensors of the checkpoint."""
    from llava.megatron.backend.rank_weights import hf_mca_config, read_rank_state
    from llava.megatron.converter.mcore_convert import chunk_file, hf_to_mcore
    from llava.megatron.converter.parallel_layout import ParallelLayout, padded_vocab_size

    hf_to_mcore(llava_checkpoint, tmp_path / "mca", tp=2, pp=2, vocab_divisor=1)  # as the backend pads
    _, mca, _ = hf_mca_config(llava_checkpoint)
    layout = ParallelLayout(2, 2, None, mca["num_layers"], mca["share_embeddings_and_output_weights"])
    padded = padded_vocab_size(mca["vocab_size"], 2, 1)
    per_stage = mca["num_layers"] // 2
    assert per_stage >= 1 and not mca["share_embeddings_and_output_weights"]
    get = SafetensorsReader.get
    for pp_rank in range(2):
        for tp_rank in range(2):
            reads: list[str] = []
            monkeypatch.setattr(SafetensorsReader, "get",
                                lambda self, name, reads=reads: reads.append(name) or get(self, name))
            (state,) = read_rank_state(llava_checkpoint, layout, tp_rank, pp_rank, padded).values()
            monkeypatch.undo()
            expected = load_file(tmp_path / "mca" / chunk_file(tp_rank, pp_rank, 0))
            if tp_rank > 0:  # the converter stores the replicated tower and projector once, with TP rank 0
                first = load_file(tmp_path / "mca" / chunk_file(0, pp_rank, 0))
                expected.update({k: v for k, v in first.items() if k.startswith(("vision_model.", "multi_modal"))})
            assert sorted(state) == sorted(expected)
            differ = [k for k in expected if not torch.equal(state[k], expected[k])]
            assert not differ, differ
            lm = [r for r in reads if "language_model" in r]  # names as the checkpoint has them (saved layout)
            layers = {int(m.group(1)) for r in lm if (m := re.search(r"\.layers\.(\d+)\.", r))}
            assert layers == set(range(pp_rank * per_stage, (pp_rank + 1) * per_stage)), (pp_rank, sorted(layers))
            first_stage = [r for r in reads if "vision_tower." in r or "multi_modal_projector." in r
                           or "embed_tokens." in r]
            last_stage = [r for r in lm if "lm_head." in r or re.search(r"language_model\.(model\.)?norm\.", r)]
            assert bool(first_stage) == (pp_rank == 0) and bool(last_stage) == (pp_rank == 1), (pp_rank, reads)
