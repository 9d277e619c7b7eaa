"""Syndrome-level explanations (DESIGN.md §5).

- ``maps``: composite faces, syndrome centroids and syndrome-wise maps.
- ``fill_in``: "fill in the blanks" for similarity towards a target.
"""
