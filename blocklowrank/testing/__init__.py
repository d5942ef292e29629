"""Test helpers for structured low rank, for this project's tests and for users' (three modules).

- :mod:`blocklowrank.testing.generators` (plain NumPy): seeded generators of
  matrices with a planted global, diagonal-block, full-block or shared-basis
  low-rank structure plus noise (``planted_matrix``, ``PlantedInfo``,
  ``planted_structures``) and of random valid layouts (``random_layout``).
- :mod:`blocklowrank.testing.strategies` (needs hypothesis, the ``test``
  extra): ``matrices``, ``layouts`` and ``planted_matrices``.
- :mod:`blocklowrank.testing.conformance`: ``check_structure``, the checks every
  registered structure passes (scikit-learn compliance, counts against the
  fitted factors, budget matching, save/load round trip), with
  ``structure_estimators`` and ``expected_failed_checks`` for
  ``parametrize_with_checks``.

Each name has one home: import it from its module (this package re-exports
nothing, so ``import blocklowrank.testing.generators`` needs no hypothesis).
"""
