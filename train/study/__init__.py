"""The structure study: grids of ordinary train.glue / train.nlg runs and their report.

`grid` (the plan, running and collecting each run), `stats` (means, paired tests, Holm), `report` (docs/RESULTS.md:
`python -m train.study.report`), `figures` (its plots); `python -m train.study` (__main__.py) drives a grid.
"""
