"""Evaluation on the paper's benchmarks (POPE, CHAIR, MME), scored as the released scripts score.

`python -m minidamro.eval --help`. Modules: data (questions, checks), engine (answers with per-image reuse),
run (run directory, resume, shards, progress), score / pope / chair / mme (metrics).
"""
