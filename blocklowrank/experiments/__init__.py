"""The paper's experiments and the studies beyond it.

Each experiment is a function that returns data (``run_*``) and a separate
plotting step; the command line writes both to ``results/``.
"""
