"""A study in each layer's data metric: the statistics checked before anything is written, their metric in
the workers, and spectra made scale-free for the model-wide allocation (see :func:`~blocklowrank.study.run_study`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .._engine import BlockSpectra
from .._metric import GRAM_DAMPING
from .._validation import OptionError
from ..calibration import CalibrationStats, load_statistics
from ..calibration._sites import SiteMetrics, check_damping, open_calibration

__all__ = ["check_calibration", "layer_metric", "release_metrics", "relative_spectra"]

#: The metrics of the study a worker process ran last: ``(key, stats, SiteMetrics)``.
_WORKER = {}


def check_calibration(calibration, gram_damping, pairs):
    """``(settings, path)``: what ``study.json`` records of the calibration (empty without), and its file.

    The statistics are checked against the layers here, before the study's
    folder is made; the workers read the file by path.
    """
    damping = check_damping(calibration, gram_damping, "run_study")
    if calibration is None:
        return {}, None
    if isinstance(calibration, CalibrationStats):
        if calibration.source is None:
            raise OptionError(
                "«calibration»: the study reads statistics by path (its workers, its resume record): pass the "
                "statistics file, or save these with blocklowrank.calibration.save_statistics"
            )
        calibration = calibration.source
    if not isinstance(calibration, (str, os.PathLike)):
        raise TypeError(f"«calibration» must be a statistics file, got {type(calibration).__name__}")
    layers = {p.module: tuple(p.shape) for p in pairs}
    stats, _ = open_calibration(calibration, layers, kinds={p.module: p.kind for p in pairs})
    stats.close()
    path = str(Path(calibration).resolve())
    return {"calibration": path, "gram_damping": float(GRAM_DAMPING if damping is None else damping)}, path


def layer_metric(settings, study, layer):
    """The keywords of ``layer``'s fit in its data metric ({} without calibration).

    A worker keeps the statistics of the study it ran last open, with the
    factors of the input sites it used last (q/k/v, gate/up share one), so a
    site is factored once per worker while its layers come one after another.
    """
    path = settings.get("calibration")
    if path is None:
        return {}
    key = (path, study)
    if _WORKER.get("key") != key:
        release_metrics()
        stats = load_statistics(path)
        _WORKER.update(key=key, stats=stats, metrics=SiteMetrics(stats, settings["gram_damping"]))
    return _WORKER["metrics"](layer)


def release_metrics():
    """Close the statistics this process keeps for its last study, and drop their factors."""
    if _WORKER.get("stats") is not None:
        _WORKER["stats"].close()
    _WORKER.clear()


def relative_spectra(sp):
    """``sp`` with every energy divided by its total ``f(0)``: allocating on these minimises the sum of the
    layers' relative squared errors (each layer's metric has its own units)."""
    total = float(sp.total_energy)
    if not total > 0:
        return sp
    root = np.sqrt(total)
    values = {k: np.asarray(v, dtype=np.float64) / root for k, v in sp.values.items()}
    return BlockSpectra(
        sp.layout, values, sp.block_energy / total, None, sp.fixed_loss / total, sp.exact, sp.gram_damping
    )
