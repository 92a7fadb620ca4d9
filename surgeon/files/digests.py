"""sha256 digests of what surgeon writes, so `surgeon verify` can prove every byte.

Tensors are hashed from the files just written (their bytes are still in the page cache), on a
few threads; the model's output on the example is hashed as float64.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from surgeon.errors import CheckpointError
from surgeon.files.recipe_file import CALIBRATION, EXAMPLE
from surgeon.files.weights import NAMES, Checkpoint, Stored, byte_view


def output_digest(vector: torch.Tensor) -> str:
    """sha256 of an output vector's float64 bytes."""
    data = vector.detach().to(torch.float64).cpu().contiguous()
    return hashlib.sha256(byte_view(data)).hexdigest()  # no numpy: torch does not require it


DIGEST_CHUNK = 16 << 20  # bytes hashed per read


def tensor_digests(checkpoint: Checkpoint) -> dict[str, dict[str, Any]]:
    """Per tensor of `checkpoint`: its dtype, shape and the sha256 of its raw bytes, read back
    from the file (just written, the bytes are still in the page cache). Tensors are hashed on
    a few threads (hashlib releases the GIL), so this costs about one read of the checkpoint
    spread over the cores."""
    from concurrent.futures import ThreadPoolExecutor

    entries = sorted(checkpoint.values(), key=lambda s: -s.nbytes)  # the largest first
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        hashes = dict(zip((s.key for s in entries), pool.map(stored_sha256, entries)))
    return {key: {"dtype": NAMES[checkpoint[key].dtype], "shape": list(checkpoint[key].shape),
                  "sha256": hashes[key]} for key in sorted(hashes)}


def stored_sha256(stored: Stored) -> str:
    """sha256 of one stored tensor's bytes, read in chunks of `DIGEST_CHUNK`."""
    digest, done = hashlib.sha256(), 0
    buffer = bytearray(min(DIGEST_CHUNK, stored.nbytes))
    with open(stored.file, "rb", buffering=0) as f:
        f.seek(stored.start)
        while done < stored.nbytes:
            view = memoryview(buffer)[:min(DIGEST_CHUNK, stored.nbytes - done)]
            got = f.readinto(view)
            if not got:
                raise CheckpointError(f"{stored.file} ended while reading {stored.key!r}; the "
                                      "file changed or is truncated")
            digest.update(view[:got])
            done += got
    return digest.hexdigest()


def record_digests(out: Path) -> dict[str, Any]:
    """What `surgeon.json` records so `surgeon verify` can prove every byte surgeon wrote: the
    digests of the weights and of the example's (and calibration batches') tensors."""
    record: dict[str, Any] = {"algorithm": "sha256",
                              "weights": tensor_digests(Checkpoint.open(out))}
    if (out / EXAMPLE).is_file():
        record["example"] = tensor_digests(Checkpoint.open(out / EXAMPLE))
    if (out / CALIBRATION).is_file():
        record["calibration"] = tensor_digests(Checkpoint.open(out / CALIBRATION))
    return record
