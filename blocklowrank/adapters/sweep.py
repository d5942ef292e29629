"""Resumable sweeps for the adapter experiments: :mod:`blocklowrank.sweep`, under its old name."""

from ..sweep import RunLog, epoch_progress, jsonable, run_sweep

__all__ = ["RunLog", "run_sweep", "epoch_progress", "jsonable"]
