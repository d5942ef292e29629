"""Reproductions of the paper's experiments: each a function returning data,
with a separate plotting function."""
