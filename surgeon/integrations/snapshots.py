"""`SnapshotCallback`: weight snapshots for growth, taken during `Trainer.train()`.

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[SnapshotCallback(every=100, keep=20,
                                                  include="model.layers.11.")])

Every `every` optimizer steps (after the step, at `state.global_step`) the main process writes
the selected weights with a `SnapshotRecorder` into `directory` (default:
`<output_dir>/snapshots`), which `surgeon.growth.snapshots.open_snapshots` reads back. Unlike
`save_steps`, it writes no optimizer state and, with `include`, only the blocks growth needs.
`surgeon grow OUTPUT_DIR DST` then reads `OUTPUT_DIR/snapshots` and grows the model the run
saved last (`trainer.save_model()`, else the newest `checkpoint-<step>/`).
It reads `model.state_dict()` on the main process only, so models whose parameters are sharded
across processes (FSDP, DeepSpeed ZeRO-3) are not supported: use `save_steps` checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from surgeon.growth.snapshots import KeySelection, SnapshotRecorder, check_every_keep


class SnapshotCallback(TrainerCallback):
    """Runs a `SnapshotRecorder` on the Trainer's model every `every` optimizer steps."""

    def __init__(self, directory: str | os.PathLike | None = None, *, every: int,
                 keep: int | None = None, include: KeySelection = None) -> None:
        check_every_keep(every, keep)
        self.directory = None if directory is None else Path(directory)
        self.every = every
        self.keep = keep
        self.include = include
        self.recorder: SnapshotRecorder | None = None

    def _recorder(self, args: Any, model: Any) -> SnapshotRecorder:
        if model is None:
            raise RuntimeError("SnapshotCallback needs the Trainer's model")
        if self.recorder is None or self.recorder.model is not model:
            directory = self.directory or Path(args.output_dir) / "snapshots"
            self.recorder = SnapshotRecorder(model, directory, every=self.every, keep=self.keep,
                                             include=self.include)
        return self.recorder

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:  # check `include` against the model before step 1
            self._recorder(args, kwargs.get("model"))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and state.global_step % self.every == 0:
            self._recorder(args, kwargs.get("model")).record(state.global_step)
