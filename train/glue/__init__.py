"""The GLUE job: `python -m train.glue` (__main__.py).

`tasks` (the task table), `tsv` (the official .tsv reader), `data` (`load_task` over the local / HF / TFDS
sources), `pipeline` (tokenization and length-bucketed batches), `metrics` (dev metrics), `train` (the job's
loss, evaluation and data for train/runner.py).
"""
