"""The PhenoLens server: gRPC service, configuration, auth, limits and the CLI."""

import os

# FAISS's OpenMP threads spin-wait by default; on a small, shared CPU that
# starves torch (one 10k search went from 75 ms to 13 ms with PASSIVE). It must be
# set before libgomp loads, which is why it lives at the top of the server package.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
