"""`SurgeonCallback`: `surgeon.attach` for Hugging Face `Trainer` users.

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[SurgeonCallback()])

At the start of training it attaches the model's AION and ADyT statistics to the Trainer's
optimizer (the torch optimizer behind accelerate's wrapper, so GradScaler-skipped steps and
gradient-accumulation micro-steps don't count); at the end it detaches them.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from surgeon.nn.stats import Attachment, attach


class SurgeonCallback(TrainerCallback):
    """Keeps surgeon's step-time statistics updating during `Trainer.train()`."""

    def __init__(self) -> None:
        self.attachment: Attachment | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise RuntimeError("SurgeonCallback needs the Trainer's model and optimizer")
        if self.attachment is not None:
            self.attachment.remove()
        self.attachment = attach(model, optimizer)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.attachment is not None:
            self.attachment.remove()
            self.attachment = None
