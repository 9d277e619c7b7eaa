"""Research tooling, not the serving path: synthetic phenotypes and fine-tuning.

- ``synth``: synthetic "syndromes" (localised deformations of real aligned
  faces with a known ground-truth region).
- ``train``: GestaltMatcher-style fine-tuning of an embedding head on a frozen
  backbone.
- ``contrast_variants``: variants and drawings of the ``contrast`` map on region swaps;
  ``photo_variants``: altered copies of photos to run a protocol on.

Depends on ``encoder`` and ``gallery.accuracy``; nothing below it imports it.
"""
