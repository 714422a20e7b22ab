"""Training jobs (one package each: `glue/`, `nlg/`, `study/`) and the pieces they share, each written once.

`runner` (the one run: model, adapters, state, loop, summary), `loop` (train state, optimizer, jitted steps),
`model` (base model + adapters from the config), `batching` (length buckets), `holdout` (held-out train examples),
`checkpoints`, `run_log` (metrics.jsonl, TensorBoard, progress, SIGTERM), `mesh` and `placement` (devices and
shardings), `decode` (beam search and greedy decoding with a KV cache), `cli` (the entry points' shared main), `hub`;
tools that read any workdir: `analyze` (dW spectra) and `curves` (plots of metrics.jsonl).
"""
