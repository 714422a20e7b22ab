"""Training entry points and their host-side pieces (GLUE data, batching, metrics, train loop).

GLUE data: `glue_tasks` (task table), `glue_tsv` (official .tsv reader), `glue_data` (`load_task` over the
local / HF / TFDS sources), `input_pipeline` (tokenization and length-bucketed batches), `metrics`.
"""
