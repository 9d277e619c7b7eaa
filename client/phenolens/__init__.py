"""PhenoLens Python client (stub; filled in by the service issue)."""
