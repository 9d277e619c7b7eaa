"""Bearer-token authentication with read and admin scopes.

Tokens are kept only as sha256 digests (config may hold the digest or the
plain token, hashed on load) and compared in constant time. ``admin`` implies
``read``. Every phenolens.v1 method declares the scope it needs here; health
checking and reflection are open.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from server.config import TokenConfig
from server.errors import PermissionDenied, Unauthenticated

READ, ADMIN = "read", "admin"

OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

METHOD_SCOPES: dict[str, str] = {
    "/phenolens.v1.PhenoLens/GetServerInfo": READ,
    "/phenolens.v1.PhenoLens/Encode": READ,
    "/phenolens.v1.PhenoLens/Match": READ,
    "/phenolens.v1.PhenoLens/Explain": READ,
    "/phenolens.v1.PhenoLens/ExplainStream": READ,
    "/phenolens.v1.GalleryAdmin/GetImage": READ,
    "/phenolens.v1.GalleryAdmin/ListImages": READ,
    "/phenolens.v1.GalleryAdmin/GalleryStats": READ,
    "/phenolens.v1.GalleryAdmin/AddImage": ADMIN,
    "/phenolens.v1.GalleryAdmin/ImportGallery": ADMIN,
    "/phenolens.v1.GalleryAdmin/DeleteImages": ADMIN,
    "/phenolens.v1.SyndromeService/Composite": READ,
    "/phenolens.v1.SyndromeService/SyndromeMap": READ,
    "/phenolens.v1.SyndromeService/FillIn": READ,
}


def hash_token(token: str) -> str:
    """The sha256 hex digest under which a token is stored in configuration."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's configured name (never the token) and its scopes."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or ADMIN in self.scopes


# Without tokens a caller may read but never write: gallery writes always need an admin token.
ANONYMOUS = Principal("anonymous", frozenset({READ}))


def required_scope(method: str) -> str | None:
    """The scope a full method name needs; None for open methods. Unknown methods need admin."""
    if method.startswith(OPEN_SERVICES):
        return None
    return METHOD_SCOPES.get(method, ADMIN)


class TokenAuth:
    """Resolves ``authorization: Bearer <token>`` metadata to a Principal.

    With no tokens configured, authentication is off for reads only: every caller is
    ANONYMOUS with the read scope, and gallery writes are refused (the server logs a
    warning at startup).
    """

    def __init__(self, tokens: Sequence[TokenConfig]) -> None:
        self._by_digest = {
            (t.sha256.lower() if t.sha256 else hash_token(t.token)): Principal(
                t.name, frozenset(t.scopes))
            for t in tokens
        }

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        values = [v for k, v in metadata if k == "authorization"]
        if not values:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
        digest = hash_token(token.strip())
        found = None
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                found = principal
        if found is None:
            raise Unauthenticated("unknown token")
        return found

    def authorize(self, principal: Principal, method: str) -> None:
        scope = required_scope(method)
        if scope is not None and not principal.allows(scope):
            if principal is ANONYMOUS:
                raise PermissionDenied(f"this method needs the '{scope}' scope, and the server "
                                       "has no tokens configured: add an admin token under "
                                       "auth.tokens to write to the gallery")
            raise PermissionDenied(f"this method needs the '{scope}' scope; the token "
                                   f"'{principal.name}' has {sorted(principal.scopes)}")
