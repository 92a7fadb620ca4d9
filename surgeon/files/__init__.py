"""Checkpoints on disk.

`weights` reads and writes safetensors (headers checked, byte copies, shards); `lazy` maps a
module's weights only while it is called; `atomic` writes a directory all at once or not at all;
`source` resolves what a user names as SRC; `hub`, `card` and `output` publish, describe and report
a written checkpoint. Imports nothing of surgeon but `errors` and `version`.
"""
