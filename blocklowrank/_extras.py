"""Optional dependencies, imported where they are used (the floor of the library).

The core needs NumPy, SciPy, scikit-learn, joblib and threadpoolctl. Plots,
data downloads, progress bars, the Hugging Face cache and the PyTorch
calibration collector each need an extra, named here once:
``require("matplotlib")`` imports it or raises one line saying what to install.
"""

from __future__ import annotations

import importlib

__all__ = ["EXTRAS", "MissingExtraError", "require", "pyplot_agg"]

#: module -> (extra that installs it, what it is used for)
EXTRAS = {
    "matplotlib": ("plots", "figures"),
    "pooch": ("data", "downloading and verifying MNIST"),
    "tqdm": ("progress", "progress bars"),
    "huggingface_hub": ("hub", "Hugging Face model ids"),
    "hypothesis": ("test", "the strategies of blocklowrank.testing.strategies"),
    "torch": ("calibrate", "running a PyTorch model to collect calibration statistics"),
    "transformers": ("calibrate", "loading a Hugging Face model to collect calibration statistics"),
    "peft": ("peft", "loading adapters through PEFT (the MiniLM experiment)"),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""


def require(module):
    """Import ``module`` (a top-level name or a dotted submodule) or raise :class:`MissingExtraError`."""
    top = module.split(".")[0]
    extra, purpose = EXTRAS[top]
    try:
        importlib.import_module(top)  # first: a submodule imported earlier would hide a missing package
        return importlib.import_module(module)
    except ImportError as exc:
        if getattr(exc, "name", None) not in (None, top) and not str(getattr(exc, "name", "")).startswith(top + "."):
            raise  # the module is there but one of its own dependencies is broken: show that
        raise MissingExtraError(
            f"{purpose} need {top}, which is not installed: pip install 'blocklowrank[{extra}]'"
        ) from None


def pyplot_agg():
    """``matplotlib.pyplot`` on the Agg backend (files, no window), through :func:`require`."""
    require("matplotlib").use("Agg", force=False)
    return require("matplotlib.pyplot")
