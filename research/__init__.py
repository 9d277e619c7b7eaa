"""Research tooling, not the serving path: synthetic phenotypes and fine-tuning.

- ``synth``: synthetic "syndromes" (localised deformations of real aligned
  faces with a known ground-truth region).
- ``train``: GestaltMatcher-style fine-tuning of an embedding head on a frozen
  backbone.

Depends on ``encoder`` and ``gallery.accuracy``; nothing below it imports it.
"""
