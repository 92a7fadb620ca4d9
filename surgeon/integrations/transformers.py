"""`SurgeonCallback`: `surgeon.attach` for Hugging Face `Trainer` users.

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[SurgeonCallback()])

At the start of training it attaches the model's AION and ADyT statistics to the Trainer's
optimizer (the torch optimizer behind accelerate's wrapper, so GradScaler-skipped steps and
gradient-accumulation micro-steps don't count); at the end it detaches them. From then on the
model's `save_pretrained` (what `trainer.save_model` and every `checkpoint-*` save call) also
writes surgeon's files, so `surgeon.load` reloads those directories.
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn
from transformers import TrainerCallback

from surgeon.nn.stats import Attachment, attach


def save_with_recipe(model: nn.Module) -> None:
    """Make `model.save_pretrained(dir, ...)` also write surgeon's files into `dir` (once per
    model; a model not converted by surgeon is left alone). The wrapper is a method bound to
    the model, so `copy.deepcopy` binds the copy's to the copy."""
    if getattr(model, "_surgeon_passes", None) is None or not hasattr(model, "save_pretrained"):
        return
    if "save_pretrained" in model.__dict__:  # wrapped already
        return
    model.save_pretrained = types.MethodType(_save_pretrained, model)


def _save_pretrained(self: nn.Module, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
    from surgeon.checkpoint import save_into

    out = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        save_into(self, save_directory)
    return out


class SurgeonCallback(TrainerCallback):
    """Keeps surgeon's step-time statistics updating during `Trainer.train()`, and makes the
    Trainer's saves reloadable with `surgeon.load`."""

    def __init__(self) -> None:
        self.attachment: Attachment | None = None

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is not None:
            save_with_recipe(model)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise RuntimeError("SurgeonCallback needs the Trainer's model and optimizer")
        save_with_recipe(model)
        if self.attachment is not None:
            self.attachment.remove()
        self.attachment = attach(model, optimizer)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.attachment is not None:
            self.attachment.remove()
            self.attachment = None
