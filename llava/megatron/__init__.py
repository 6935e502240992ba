"""Optional Megatron-Core path, in two sub-packages that depend one way (the backend uses the converter):

- ``llava.megatron.converter``: Hugging Face checkpoints to Megatron-Core TP x PP shards and back (``llava convert``);
  needs only torch and safetensors.
- ``llava.megatron.backend``: the second training backend (``llava train --backend megatron``, launched with
  torchrun); needs megatron-core (``pip install .[megatron]``), imported only inside the backend's run.

See ``docs/architecture.md`` for the modules of each.
"""
