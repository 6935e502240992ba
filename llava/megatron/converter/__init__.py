"""Megatron-Core checkpoint converter: HF checkpoint <-> Megatron-Core (MCA) TP x PP shards; no megatron-core needed.

    llava convert hf2mcore --tp 2 --pp 2 SRC OUT     # HF checkpoint -> MCA shards
    llava convert mcore2hf SRC OUT                   # MCA shards -> HF checkpoint
    llava convert mcore2mcore --tp 4 --pp 1 SRC OUT  # reshard
    (or python -m llava.megatron.converter.convert_cli ...)

Modules: ``conversion_ops`` (conversion ops, each with its inverse), ``conversion_templates`` (registry by HF
``model_type``), ``mcore_config`` (HF <-> MCA config), ``parallel_layout`` (TP/PP/VPP split and merge),
``mcore_convert`` (the streaming converters; the on-disk MCA layout is described there), ``convert_cli``. The
streaming safetensors reader/writers are ``llava/safetensors_io.py`` (shared with ``llava merge``).
"""

__all__ = ["hf_to_mcore", "mcore_to_hf", "mcore_to_mcore", "register_template", "get_conversion_template"]


def __getattr__(name: str):  # lazy: importing llava.megatron.converter stays free of torch
    if name in ("hf_to_mcore", "mcore_to_hf", "mcore_to_mcore"):
        # lazy: importing the package stays free of torch
        from llava.megatron.converter import mcore_convert

        return getattr(mcore_convert, name)
    if name in ("register_template", "get_conversion_template"):
        # lazy: importing the package stays free of torch
        from llava.megatron.converter import conversion_templates

        return getattr(conversion_templates, name)
    raise AttributeError(name)
