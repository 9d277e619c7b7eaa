"""The default explanation, importable without torch (server configuration reads it).

``contrast`` first: where the two faces differ, on both faces (blue = differs).
``similarity`` beside it: what pulls them together. Every other method of the
family (``explain.attribution.matches.METHOD_NAMES``) is available by name.
"""

DEFAULT_METHODS: tuple[str, ...] = ("contrast", "similarity")
