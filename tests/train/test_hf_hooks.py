"""One test per private ``transformers`` hook listed in ``llava/train/hf_hooks.py``: it still exists, its parameters
are the ones our override was written against, and the transformers code that calls it still does.

    .venv/bin/pytest tests/train/test_hf_hooks.py

Also: every private ``Trainer`` method ``LLaVATrainer`` overrides is listed (a new override cannot go unlisted), and
each override accepts the parameters of the method it replaces.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import transformers

from llava.train.args import TrainingArguments
from llava.train.hf_hooks import PRIVATE_HOOKS, TRANSFORMERS_VERSION
from llava.train.trainer import LLaVATrainer


def resolve(target: str):
    module, _, qualname = target.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
    return obj


def parameter_names(obj) -> tuple[str, ...]:
    func = obj.func if hasattr(obj, "func") else obj  # functools.cached_property keeps the function in .func
    out = []
    for p in inspect.signature(func).parameters.values():
        out.append(p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}")
    return tuple(out)


def test_written_against_the_pinned_transformers():
    assert transformers.__version__ == TRANSFORMERS_VERSION, (
        f"transformers {transformers.__version__} is installed; llava/train/hf_hooks.py was checked against "
        f"{TRANSFORMERS_VERSION}: re-check each hook, then update the table")


@pytest.mark.parametrize("hook", PRIVATE_HOOKS, ids=lambda h: h.target.partition(":")[2])
def test_private_hook_signature_and_call_site(hook):
    obj = resolve(hook.target)
    if hook.parameters:
        assert parameter_names(obj) == hook.parameters, f"{hook.target} changed: {hook.why}"
    if hook.depends_on is not None:
        caller, text = hook.depends_on
        source = inspect.getsource(resolve(caller))
        assert text in source, f"{caller} no longer contains {text!r}, which {hook.target} relies on: {hook.why}"


def test_every_private_override_is_listed_and_accepts_the_parent_parameters():
    listed = {h.target.partition(":")[2] for h in PRIVATE_HOOKS}
    overridden = set()
    for ours, theirs in ((LLaVATrainer, transformers.Trainer), (TrainingArguments, transformers.TrainingArguments)):
        overridden |= {f"{theirs.__name__}.{name}" for name in vars(ours)
                       if name.startswith("_") and not name.startswith("__") and hasattr(theirs, name)}
    assert "TrainingArguments._setup_devices" in overridden and "Trainer._save_checkpoint" in overridden
    assert overridden and overridden <= listed, f"private overrides not listed in hf_hooks.py: {overridden - listed}"
    for name in (n.partition(".")[2] for n in overridden if n.startswith("Trainer.")):
        ours = [p.name for p in inspect.signature(getattr(LLaVATrainer, name)).parameters.values()]
        theirs = [p.name for p in inspect.signature(getattr(transformers.Trainer, name)).parameters.values()]
        assert ours == theirs, f"LLaVATrainer.{name}{ours} does not take transformers' parameters {theirs}"
