"""Capturing and analysing models.

`tracing` records one real call of every module and captures a verified torch.fx graph per module;
`find` reads residual adds, norms and trunks off those graphs (`report` holds what it returns);
`rewrite` is the workbench passes edit graphs on; `example_inputs` builds the example a trace
records. May import `surgeon.files` and `surgeon.nn`, never a face.
"""
