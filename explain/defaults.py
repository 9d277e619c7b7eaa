"""The default explanation, importable without torch (server configuration reads it).

``contrast`` first: where the two faces differ, on both faces (blue = differs).
``similarity`` beside it: what pulls them together. Both are marked ``default`` in the
method catalogue (``explain.attribution.catalogue``), which lists every other method.
"""

from explain.attribution.catalogue import DEFAULT_METHODS

__all__ = ["DEFAULT_METHODS"]
