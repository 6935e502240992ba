"""Shared fixtures: a small synthetic shapes dataset and tiny real models written to disk once per session.

Everything is built locally (no hub): the models load through the same ``from_pretrained`` path as real ones.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> dict:
    """``{"image_folder", "stage1_captions", "stage2_qa", "heldout_qa"}`` for a small shapes dataset."""
    from llava.demo.shapes import generate_shapes_dataset

    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_caption=96, n_qa=96, n_heldout=32, seed=0)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, shapes_data) -> dict:
    """``{"vision_tower": CLIP dir, "siglip_tower": SigLIP dir, "llm": Llama dir}``."""
    from llava.demo.tiny_models import write_demo_models, write_tiny_vision_tower

    workdir = tmp_path_factory.mktemp("models")
    paths = dict(write_demo_models(workdir, shapes_data))
    paths["siglip_tower"] = write_tiny_vision_tower(workdir / "models" / "tiny-siglip-vision", kind="siglip")
    return paths
