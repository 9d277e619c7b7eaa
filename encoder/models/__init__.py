"""Encoder architectures and their weight converters; each module registers itself.

Use ``encoder.registry.create_encoder(name)`` rather than these modules directly.
"""
