"""Each catalogue entry's implementation: ``METHODS``, name -> the ``Method`` that computes it.

The catalogue (``explain.attribution.catalogue``) names each method's class as
``module.Class``; this is the one place those names are resolved, against the three
modules that hold the family: ``cam`` (maps from the head's gradient, and the engine's
batched maps), ``pixel`` (perturbation and gradient methods) and ``verification``
(xSSAB, CorrRISE).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType, ModuleType

from explain.attribution import cam, pixel, verification
from explain.attribution.catalogue import CATALOGUE, MethodSpec
from explain.attribution.family import Method

_MODULES: Mapping[str, ModuleType] = {"cam": cam, "pixel": pixel, "verification": verification}


def _implement(spec: MethodSpec) -> Method:
    module, cls = spec.implementation.split(".")
    method = getattr(_MODULES[module], cls)(spec)
    if spec.batched and not hasattr(method, "batched_maps"):
        raise TypeError(f"{spec.name} is declared batched but {cls} has no batched_maps")
    return method


METHODS: Mapping[str, Method] = MappingProxyType({s.name: _implement(s) for s in CATALOGUE})
