"""Explanations of embedding similarity (DESIGN.md §5).

- ``explain.engine``: ``Explainer(model).explain(query, hits)`` — two-sided
  similarity maps and embedding Grad-CAM for a top-K result in one batched
  pass; ``correspondence`` for point-to-face maps; ``encode`` to cache features.
- ``explain.methods``: ``attribute(method, explainer, query, hit, *, budget,
  time_limit, cancel, ...)`` — the attribution family with one uniform call.
- ``explain.affine``: the cached linearisation of an encoder's affine head.
- ``explain.render``: overlays and pair figures (signed, diverging colormap).
- ``explain.errors``: typed errors, mapped to gRPC codes in ``server.errors``.

Importing this package loads nothing heavy; import the submodules you use.
"""
