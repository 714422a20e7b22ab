"""The table-to-text job (E2E, WebNLG, DART): `python -m train.nlg` (__main__.py).

`data` (the LoRA-repo files, token formats, LM batches and loss), `evaluation` (decoding and scoring a split),
`metrics` (BLEU, NIST, METEOR, ROUGE-L, CIDEr, TER), `train` (the job's parts for train/runner.py).
"""
