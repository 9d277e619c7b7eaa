"""Attribution: maps of what makes two faces similar (DESIGN.md §5).

- ``catalogue``: every method declared once (``MethodSpec``: batched or per pair,
  pixels, gradients, passes, options, sign, sum rule, default); names, defaults,
  ``check_methods`` and option typing are views of it. Importable without torch.
- ``implementations``: ``METHODS``, each catalogue entry's ``Method``, resolved once
  from the three modules of the family: ``cam`` (the CAM family and the engine's
  batched maps), ``pixel`` (perturbation and gradient methods, captum's public API),
  ``verification`` (xSSAB, CorrRISE); ``family`` is their shared base.
- ``engine``: ``Explainer(views)``; ``features``/``encode`` → ``FaceFeatures``
  (cacheable), the batched top-K maps of ``BATCHED_MAPS`` (the catalogue's batched
  methods), ``correspondence`` for point-to-face maps.
- ``methods``: ``attribute``, the one call per pair for every method.
- ``matches``: ``explain_matches`` (a query and K hits → ``MatchMaps``), ``warm_up``.
- ``affine``: the cached linearisation of an encoder's affine head.
- ``views``: view schemes (single encoder, ensembles, flips) as pixel inputs.
"""
