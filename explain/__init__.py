"""Explanations of embedding similarity (DESIGN.md §5).

Subpackages, one idea each (import the submodules you use; importing a package
loads nothing heavy):

- ``explain.attribution``: the engine (``Explainer``: two-sided similarity maps
  and embedding Grad-CAM for a top-K result in one batched pass), the attribution
  family (``methods``), the affine-head linearisation, view schemes, and
  ``matches.explain_matches`` — maps for a query and its K hits, the one path the
  server, the CLI, evaluation and the syndrome tools share.
- ``explain.evaluation``: map metrics and the evaluation protocols (faithfulness,
  sanity, localization, cost, accuracy), one module each, and their report.
- ``explain.syndrome``: syndrome-level tools (composites, syndrome maps, fill-in).
- ``explain.regions``: landmark region masks (rendering, server, evaluation).
- ``explain.render``: overlays and pair figures (signed, diverging colormap).
- ``explain.errors`` / ``explain.limits``: typed errors (mapped to gRPC codes in
  ``server.errors``) and the budget/time/cancel guard, shared by all of them.
"""
