"""Face detector implementations; each module registers itself with ``encoder.detect``."""
