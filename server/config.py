"""The service configuration: one YAML or TOML file plus ``PHENOLENS_...`` environment overrides.

Environment variables name a key by its path, sections joined by a double
underscore, and their values are read as YAML scalars or lists::

    PHENOLENS_LISTEN=0.0.0.0:50051
    PHENOLENS_LIMITS__MAX_CONCURRENT=4
    PHENOLENS_GALLERY__PATH=/data/gallery.sqlite
    PHENOLENS_AUTH__TOKENS='[{name: ops, scopes: [admin], sha256: 9f86...}]'

Variables that name no key here are left alone (``PHENOLENS_DEVICE`` and
``PHENOLENS_TORCH_THREADS`` belong to ``encoder.runtime``, which reads them
itself). Unknown keys in the file are an error, so a typo never goes unnoticed.
Relative paths in a file are resolved against the file's folder.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from explain.defaults import DEFAULT_METHODS

ENV_PREFIX = "PHENOLENS_"
DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_GALLERY = Path("data/galleries/default.sqlite")
SCOPES = ("read", "admin")


class ConfigError(ValueError):
    """A configuration file or override that cannot be used (says which key and why)."""


@dataclass(frozen=True)
class TokenConfig:
    """One bearer token: its sha256 (hex) as stored, the scopes it grants, and a name for logs.

    ``token`` (plain text) is accepted for convenience and hashed on load.
    """

    name: str
    scopes: tuple[str, ...] = ("read",)
    sha256: str = ""
    token: str = field(default="", repr=False)


@dataclass(frozen=True)
class AuthConfig:
    """No tokens: every call is allowed (loopback development). Health and reflection are open."""

    tokens: tuple[TokenConfig, ...] = ()


@dataclass(frozen=True)
class TLSConfig:
    """Server certificate and key (PEM files); ``client_ca`` turns on mutual TLS."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    require_client_cert: bool = True  # with client_ca

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True)
class EncoderConfig:
    name: str = "sface"
    weights: Path | None = None
    flip: bool = True
    gray: bool = False
    view_scheme: str = ""  # e.g. "sface:orig,sface:flip"; overrides name/flip/gray when set
    detector: str = "yunet"  # face detector (encoder.detect.list_detectors): yunet or mtcnn

    def scheme_id(self) -> str:
        """The view scheme id these settings name: ``view_scheme`` when set, else
        ``name:orig`` (+ ``name:flip``) (+ ``name:gray`` (+ ``name:flip+gray``))."""
        if self.view_scheme:
            return self.view_scheme
        views = [f"{self.name}:orig"] + ([f"{self.name}:flip"] if self.flip else [])
        if self.gray:
            views += [f"{self.name}:orig+gray"] + ([f"{self.name}:flip+gray"] if self.flip else [])
        return ",".join(views)


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "cpu"
    torch_threads: int | None = None


@dataclass(frozen=True)
class GalleryConfig:
    path: Path = DEFAULT_GALLERY
    index: str = ""  # FAISS factory string; empty: the gallery's default (exact inner product)
    # Read replicas: a folder of published snapshots (deploy/gallery_snapshot.py); the
    # server loads ``current`` at start and each newer one within follow_interval_s.
    follow_snapshots: Path | None = None
    follow_interval_s: float = 10.0


@dataclass(frozen=True)
class ExplainConfig:
    methods: tuple[str, ...] = DEFAULT_METHODS
    time_limit_s: float = 30.0
    budget: int = 1024  # forward passes per method call
    # Explain keeps the model's features of this many recently explained gallery
    # faces in memory (LRU, keyed by gallery id and checked against the sha256 of
    # the stored crop, so an updated crop is recomputed) in front of the feature store
    # beside the gallery file. SFace with flip, CAM and contrast-layer maps: about
    # 1.24 MB per face, so the default holds ~160 MB. 0 disables.
    feature_cache_size: int = 128


@dataclass(frozen=True)
class LimitsConfig:
    max_message_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_top_k: int = 50
    max_explain_methods: int = 4
    max_page_size: int = 1000
    max_photo_map_side: int = 512  # photo maps are downscaled to this longer side
    # Heavy calls (Encode, Match, Explain, AddImage, ImportGallery) hold one of
    # max_concurrent slots. At most max_queued wait for one; a call that cannot get
    # one within queue_timeout_s of its arrival, finds the queue full, or arrives
    # while the process's RSS is at max_rss_bytes is refused with RESOURCE_EXHAUSTED
    # and a retry hint (trailing metadata retry-after-ms). max_rss_bytes -1 (the
    # default): 85 % of the memory the process may use (its cgroup's limit, else
    # physical RAM); 0: no limit.
    max_concurrent: int = 2
    max_queued: int = 14
    queue_timeout_s: float = 2.0
    max_rss_bytes: int = -1
    workers: int = 24  # gRPC handler threads; > max_concurrent + max_queued
    # Calls in handlers at once (health and reflection not counted); beyond it the
    # interceptor answers RESOURCE_EXHAUSTED (with an access-log line).
    max_pending_rpcs: int = 64


@dataclass(frozen=True)
class LogConfig:
    level: str = "INFO"
    json: bool = True


@dataclass(frozen=True)
class ServiceConfig:
    listen: str = DEFAULT_LISTEN
    shutdown_grace_s: float = 10.0
    encoder: EncoderConfig = EncoderConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    gallery: GalleryConfig = GalleryConfig()
    explain: ExplainConfig = ExplainConfig()
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    tls: TLSConfig = TLSConfig()
    log: LogConfig = LogConfig()


def _read_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: "
                          f"{exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """Nested dict of the PHENOLENS_* variables that name a known key."""
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        cls: Any = ServiceConfig
        for part in path[:-1]:
            hint = _field_types(cls).get(part) if dataclasses.is_dataclass(cls) else None
            cls = hint if dataclasses.is_dataclass(hint) else None
            if cls is None:
                break
        if cls is None or path[-1] not in _field_types(cls):
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{name}: not a YAML value: {exc}") from None
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _convert(hint: Any, value: Any, where: str, base_dir: Path | None) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, base_dir)
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{where}: must not be empty")
    if "Path" in text:
        path = Path(str(value)).expanduser()
        return base_dir / path if base_dir is not None and not path.is_absolute() else path
    if "tuple" in text:
        items = value if isinstance(value, list | tuple) else [
            v.strip() for v in str(value).split(",") if v.strip()
        ]
        if "TokenConfig" in text:
            return tuple(_build(TokenConfig, item, f"{where}[{i}]", base_dir)
                         for i, item in enumerate(items))
        return tuple(str(v) for v in items)
    try:
        if text.startswith("int") or hint is int:
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if hint is float or text == "float":
            return float(value)
        if hint is bool or text == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {hint if isinstance(hint, type) else text}, "
                          f"got {value!r}") from None
    return str(value)


def _build(cls: type, data: Any, where: str, base_dir: Path | None) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = _field_types(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; known: {sorted(hints)}")
    kwargs = {key: _convert(hints[key], value, f"{where}.{key}".lstrip("."), base_dir)
              for key, value in data.items()}
    return cls(**kwargs)


def _validate(config: ServiceConfig) -> ServiceConfig:
    limits = config.limits
    for name in ("max_top_k", "max_concurrent", "workers", "max_pending_rpcs", "max_page_size",
                 "max_explain_methods", "max_photo_map_side", "max_message_bytes", "max_image_bytes",
                 "max_image_pixels"):
        if getattr(limits, name) < 1:
            raise ConfigError(f"limits.{name} must be at least 1")
    if config.explain.feature_cache_size < 0:
        raise ConfigError("explain.feature_cache_size must be >= 0 (0 disables the cache)")
    if limits.queue_timeout_s < 0 or config.shutdown_grace_s < 0:
        raise ConfigError("limits.queue_timeout_s and shutdown_grace_s must be >= 0")
    if limits.workers <= limits.max_concurrent + limits.max_queued:
        raise ConfigError("limits.workers must be more than limits.max_concurrent + "
                          "limits.max_queued, so light calls always find a thread")
    if config.gallery.follow_interval_s <= 0:
        raise ConfigError("gallery.follow_interval_s must be > 0")
    if limits.max_queued < 0:
        raise ConfigError("limits.max_queued must be >= 0")
    if limits.max_rss_bytes < -1:
        raise ConfigError("limits.max_rss_bytes must be -1 (85 % of the memory the process "
                          "may use), 0 (no limit) or a number of bytes")
    for i, token in enumerate(config.auth.tokens):
        bad = sorted(set(token.scopes) - set(SCOPES))
        if bad or not token.scopes:
            raise ConfigError(f"auth.tokens[{i}] ({token.name}): scopes must be from {SCOPES}")
        if bool(token.sha256) == bool(token.token):
            raise ConfigError(f"auth.tokens[{i}] ({token.name}): give exactly one of sha256, token")
        if token.sha256 and len(token.sha256) != 64:
            raise ConfigError(f"auth.tokens[{i}] ({token.name}): sha256 must be 64 hex digits")
    tls = config.tls
    if (tls.cert is None) != (tls.key is None):
        raise ConfigError("tls.cert and tls.key go together")
    if tls.client_ca is not None and not tls.enabled:
        raise ConfigError("tls.client_ca (mutual TLS) needs tls.cert and tls.key")
    return config


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None,
                **overrides: Any) -> ServiceConfig:
    """The configuration from ``path`` (YAML or TOML; None: defaults), then the environment,
    then keyword ``overrides`` (nested dicts, e.g. ``limits={"max_concurrent": 1}``)."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    base_dir = None
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"configuration file {path} does not exist")
        data = _read_file(path)
        base_dir = path.resolve().parent
    data = _merge(data, _env_overrides(env))
    data = _merge(data, overrides)
    return _validate(_build(ServiceConfig, data, "", base_dir))
