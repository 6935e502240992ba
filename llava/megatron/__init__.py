"""Optional Megatron-Core path: convert Hugging Face checkpoints to Megatron-Core (TP x PP shards) and back.

The converter imports no megatron-core: it needs only torch and safetensors. Entry points::

    python -m llava.megatron.cli hf2mcore --tp 2 --pp 2 SRC OUT     # HF checkpoint -> MCA shards
    python -m llava.megatron.cli mcore2hf SRC OUT                   # MCA shards -> HF checkpoint
    python -m llava.megatron.cli mcore2mcore --tp 4 --pp 1 SRC OUT  # reshard

Modules: ``ops`` (conversion ops), ``template`` (registry by HF ``model_type``), ``config`` (HF <-> MCA config),
``dist`` (TP/PP/VPP split and merge), ``convert`` (the streaming converters), ``cli``. The streaming safetensors
reader/writers are ``llava/safetensors_io.py`` (shared with ``llava merge``). The on-disk MCA layout is described in
``convert``.

The Megatron training backend (``llava train --backend megatron``; needs megatron-core) is ``train`` (the recipe),
``args``, ``init_checkpoint``, ``weights``, ``model``, ``packed``, ``data``, ``steps``, ``checkpoint``, ``export``,
``memory`` and ``cpu_compat``; see ``docs/architecture.md``.
"""

__all__ = ["hf_to_mcore", "mcore_to_hf", "mcore_to_mcore", "register_template", "get_conversion_template"]


def __getattr__(name: str):  # lazy: importing llava.megatron stays free
    if name in ("hf_to_mcore", "mcore_to_hf", "mcore_to_mcore"):
        from llava.megatron import convert

        return getattr(convert, name)
    if name in ("register_template", "get_conversion_template"):
        from llava.megatron import template

        return getattr(template, name)
    raise AttributeError(name)
