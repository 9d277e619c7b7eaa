"""Evaluation of explanations (DESIGN.md §5): numpy metrics and protocols.

- ``metrics``: map metrics (deletion/insertion curves, pointing, rank
  correlations, ...), numpy only.
- ``common``: photo pairs (``FacePair``, ``photo_pairs``), ``PairTarget``,
  ``embed_views`` and query maps through ``explain_matches``.
- one module per protocol: ``faithfulness``, ``sanity``, ``localization``,
  ``cost``, ``accuracy``, ``swap`` (region swaps between two people's photos).
- ``report``: JSON, Markdown and PNG output of the protocols' results.

GestaltMatcher matching accuracy lives in ``gallery.accuracy`` (numpy only).
"""
