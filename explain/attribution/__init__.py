"""Attribution: maps of what makes two faces similar (DESIGN.md §5).

- ``engine``: ``Explainer(views)``; ``encode`` → ``FaceFeatures`` (cacheable),
  the batched top-K maps of ``BATCHED_MAPS`` ("contrast", "similarity", "gradcam"),
  ``correspondence`` for point-to-face maps.
- ``methods``: the attribution family (``Method`` subclasses, ``METHODS``), one
  uniform call per pair on precomputed features.
- ``matches``: ``explain_matches`` (a query and K hits → ``MatchMaps``) and the
  method catalogue (names, defaults, validation, option typing) — once.
- ``affine``: the cached linearisation of an encoder's affine head.
- ``views``: view schemes (single encoder, ensembles, flips) as pixel inputs.
"""
