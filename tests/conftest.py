"""Test configuration: hypothesis profiles (after SciPy's ``scipy/conftest.py``).

Two profiles:

- ``ci`` (the default): derandomized, so every run draws the same examples;
  no example database, no deadline (shared CI machines have noisy timings),
  about 40 examples per property, and ``print_blob`` so a failure prints the
  ``@reproduce_failure`` blob.
- ``dev``: random examples, more of them, with the example database, for
  hunting bugs locally: ``BLOCKLOWRANK_HYPOTHESIS_PROFILE=dev pytest tests``.

The profile is chosen by ``BLOCKLOWRANK_HYPOTHESIS_PROFILE``; when it is not
set, ``ci`` is used (whether or not the ``CI`` variable is set).
"""

import os

try:
    import hypothesis
except ImportError:  # the property tests skip themselves without hypothesis
    hypothesis = None

if hypothesis is not None:
    hypothesis.settings.register_profile(
        "ci",
        derandomize=True,
        deadline=None,
        max_examples=40,
        print_blob=True,
        database=None,
        suppress_health_check=[hypothesis.HealthCheck.too_slow],
    )
    hypothesis.settings.register_profile("dev", deadline=None, max_examples=200, print_blob=True)
    hypothesis.settings.load_profile(os.environ.get("BLOCKLOWRANK_HYPOTHESIS_PROFILE", "ci"))
