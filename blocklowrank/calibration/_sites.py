"""Statistics put to use: opened and checked against a model's layers, and each layer's metric for a fit.

:func:`open_calibration` takes a statistics file or :class:`CalibrationStats`
and refuses, before anything is written, statistics that do not fit the
layers (:func:`check_statistics`). :class:`SiteMetrics` gives each layer the
keywords of a fit in its metric (``input_gram``, ``output_gram``), factoring
each input site's ``G`` once for all the layers that read it.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict

from .._params import check
from .._validation import OptionError
from ._stats import CalibrationStats, check_statistics, load_statistics

__all__ = ["open_calibration", "check_damping", "SiteMetrics"]


def check_damping(calibration, gram_damping, caller):
    """``gram_damping`` checked (None: the metric's default), refused without ``calibration``."""
    if gram_damping is None:
        return None
    if calibration is None:
        raise OptionError("«gram_damping» damps the data metric of «calibration»: pass «calibration» too")
    return check(gram_damping, "gram_damping", caller=caller)


def open_calibration(calibration, layers, *, kinds=None, factor=True):
    """``(stats, opened)``: the statistics checked against ``layers`` ({module: (out, in)}).

    ``calibration``: a path to a statistics file or :class:`CalibrationStats`.
    ``opened`` is True when the file was opened here (the caller closes it).
    ``kinds`` ({module: kind}) refuses embeddings by name: their input (token
    ids) has no second moment. ``factor``: as :func:`check_statistics`'s. Raises :class:`CalibrationError` (one line,
    naming the file and the entry) for statistics that do not fit.
    """
    for module, kind in (kinds or {}).items():
        if kind == "embedding":
            raise OptionError(
                f"«calibration»: {module!r} is an embedding, whose inputs (token ids) have no second moment to fit "
                "it in; leave it out with «target_modules»"
            )
    if isinstance(calibration, CalibrationStats):
        stats, opened = calibration, False
    elif isinstance(calibration, (str, os.PathLike)):
        stats, opened = load_statistics(calibration), True
    else:
        raise TypeError(
            f"«calibration» must be a statistics file (blocklowrank calibrate) or CalibrationStats, "
            f"got {type(calibration).__name__}"
        )
    try:
        check_statistics(stats, layers, factor=factor)
    except BaseException:
        if opened:
            stats.close()
        raise
    return stats, opened


class SiteMetrics:
    """Each layer's data metric from checked statistics, one factorisation per input site.

    Parameters
    ----------
    stats : CalibrationStats
        Checked against the layers (:func:`open_calibration`).
    damping : float, optional
        ``gram_damping`` of every factor (default :data:`~blocklowrank.GRAM_DAMPING`).
    layers : sequence of str, optional
        The layers to be fitted, each once: a site's factor is dropped after
        its last layer (or :meth:`skip`), so each site is factored once
        whatever the order. Without it, the ``keep`` sites used last are kept.
    keep : int, default=4
    """

    def __init__(self, stats, damping=None, layers=None, keep=4):
        self.stats, self.damping, self.keep = stats, damping, keep
        self._left = None if layers is None else Counter(stats.site_of(layer) for layer in layers)
        self._cache = OrderedDict()
        self.factored = 0  # sites factored so far

    def __call__(self, layer):
        """``{"input_gram": GramFactor, "output_gram": GramFactor or None}`` of ``layer``."""
        site = self.stats.site_of(layer)
        G = self._cache.pop(site, None)
        if G is None:
            G = self.stats.input_factor(layer, self.damping)
            self.factored += 1
        self._release(site, G)
        return {"input_gram": G, "output_gram": self.stats.output_factor(layer, self.damping)}

    def skip(self, layer):
        """``layer`` will not be fitted: its site's factor is not kept for it."""
        site = self.stats.site_of(layer)
        self._release(site, self._cache.pop(site, None))

    def _release(self, site, G):
        if self._left is not None:
            self._left[site] -= 1
            if self._left[site] > 0 and G is not None:
                self._cache[site] = G
            return
        if G is not None:
            self._cache[site] = G
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
