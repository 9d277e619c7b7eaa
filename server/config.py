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

pydantic-settings reads and merges the sources (keyword overrides, then the
environment, then the file); the sections are frozen pydantic dataclasses, so
values are checked and converted by type, and ``dataclasses.replace`` and
``dataclasses.asdict`` work on them as on any dataclass.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, get_args, get_type_hints

import yaml
from pydantic import BeforeValidator, ConfigDict, ValidationError, create_model
from pydantic.dataclasses import dataclass
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from explain.defaults import DEFAULT_METHODS

ENV_PREFIX = "PHENOLENS_"
DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_GALLERY = Path("data/galleries/default.sqlite")
SCOPES = ("read", "admin")


class ConfigError(ValueError):
    """A configuration file or override that cannot be used (says which key and why)."""


# While load_config runs: the environment and the file it reads (their folder resolves
# relative paths). Outside it, e.g. in dataclasses.replace, paths are taken as given.
_LOADING: ContextVar[tuple[Mapping[str, str], Path | None]] = ContextVar("phenolens_config")


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected an integer, not a boolean")
    return value


def _names(value: Any) -> Any:
    """A list, or one string of comma-separated names."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value] if isinstance(value, list | tuple) else value


def _path(value: Any) -> Any:
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    loading = _LOADING.get(None)
    if loading is not None and loading[1] is not None and not path.is_absolute():
        return loading[1].resolve().parent / path
    return path


Int = Annotated[int, BeforeValidator(_no_bool)]
Names = Annotated[tuple[str, ...], BeforeValidator(_names)]
ConfigPath = Annotated[Path, BeforeValidator(_path)]
SECTION = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


@dataclass(frozen=True, config=SECTION)
class TokenConfig:
    """One bearer token: its sha256 (hex) as stored, the scopes it grants, and a name for logs.

    ``token`` (plain text) is accepted for convenience and hashed on load.
    """

    name: str
    scopes: Names = ("read",)
    sha256: str = ""
    token: str = dataclasses.field(default="", repr=False)


@dataclass(frozen=True, config=SECTION)
class AuthConfig:
    """No tokens: every call is allowed (loopback development). Health and reflection are open."""

    tokens: tuple[TokenConfig, ...] = ()


@dataclass(frozen=True, config=SECTION)
class TLSConfig:
    """Server certificate and key (PEM files); ``client_ca`` turns on mutual TLS."""

    cert: ConfigPath | None = None
    key: ConfigPath | None = None
    client_ca: ConfigPath | None = None
    require_client_cert: bool = True  # with client_ca

    @property
    def enabled(self) -> bool:
        return self.cert is not None


@dataclass(frozen=True, config=SECTION)
class EncoderConfig:
    name: str = "sface"
    weights: ConfigPath | None = None
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


@dataclass(frozen=True, config=SECTION)
class RuntimeConfig:
    device: str = "cpu"
    torch_threads: Int | None = None


@dataclass(frozen=True, config=SECTION)
class GalleryConfig:
    path: ConfigPath = DEFAULT_GALLERY
    index: str = ""  # FAISS factory string; empty: the gallery's default (exact inner product)
    # Read replicas: a folder of published snapshots (deploy/gallery_snapshot.py); the
    # server loads ``current`` at start and each newer one within follow_interval_s.
    follow_snapshots: ConfigPath | None = None
    follow_interval_s: float = 10.0


@dataclass(frozen=True, config=SECTION)
class ExplainConfig:
    methods: Names = DEFAULT_METHODS
    time_limit_s: float = 30.0
    budget: Int = 1024  # forward passes per method call
    # Explain keeps the model's features of this many recently explained gallery
    # faces in memory (LRU, keyed by gallery id and checked against the sha256 of
    # the stored crop, so an updated crop is recomputed) in front of the feature store
    # beside the gallery file. SFace with flip, CAM and contrast-layer maps: about
    # 1.24 MB per face, so the default holds ~160 MB. 0 disables.
    feature_cache_size: Int = 128
    # Gallery faces added to the feature store get their region effects' neutral edits
    # too (9 regions x each view, about 2x an encode per face at import), so the first
    # Explain with effects of any hit pays only for the edits that depend on the query.
    store_neutral_edits: bool = True


@dataclass(frozen=True, config=SECTION)
class LimitsConfig:
    max_message_bytes: Int = 32 * 1024 * 1024
    max_image_bytes: Int = 20 * 1024 * 1024
    max_image_pixels: Int = 40_000_000
    max_top_k: Int = 50
    max_explain_methods: Int = 4
    max_page_size: Int = 1000
    max_photo_map_side: Int = 512  # photo maps are downscaled to this longer side
    # Heavy calls (Encode, Match, Explain, AddImage, ImportGallery) hold one of
    # max_concurrent slots. At most max_queued wait for one; a call that cannot get
    # one within queue_timeout_s of its arrival, finds the queue full, or arrives
    # while the process's RSS is at max_rss_bytes is refused with RESOURCE_EXHAUSTED
    # and a retry hint (trailing metadata retry-after-ms). max_rss_bytes -1 (the
    # default): the smaller of 85 % of the memory the process may use (its cgroup's
    # limit, else physical RAM) and its RSS at start + 3 GiB (server.limits); 0: no limit.
    max_concurrent: Int = 2
    max_queued: Int = 14
    queue_timeout_s: float = 2.0
    max_rss_bytes: Int = -1
    workers: Int = 24  # gRPC handler threads; > max_concurrent + max_queued
    # Calls in handlers at once (health and reflection not counted); beyond it the
    # interceptor answers RESOURCE_EXHAUSTED (with an access-log line).
    max_pending_rpcs: Int = 64


@dataclass(frozen=True, config=SECTION)
class LogConfig:
    level: str = "INFO"
    json: bool = True


@dataclass(frozen=True, config=SECTION)
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


def _section_fields(cls: Any, keys: Iterator[str]) -> dict[str, Any] | None:
    """The fields (name -> type) of the section that ``keys`` lead to from ``cls``."""
    for key in keys:
        cls = get_type_hints(cls).get(key) if dataclasses.is_dataclass(cls) else None
        cls = next(iter(get_args(cls)), cls)  # tuple[TokenConfig, ...]: its items
    return get_type_hints(cls) if dataclasses.is_dataclass(cls) else None


class _Environment(EnvSettingsSource):
    """The PHENOLENS_<SECTION>__<KEY> variables that name a key (others are left alone),
    their values read as YAML."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        known = {}
        for name, raw in env.items():
            *sections, key = name[len(ENV_PREFIX):].lower().split("__")
            if not name.startswith(ENV_PREFIX) or \
                    key not in (_section_fields(ServiceConfig, iter(sections)) or ()):
                continue
            try:
                known[name.lower()] = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError as exc:
                raise ConfigError(f"{name}: not a YAML value: {exc}") from None
        self.env_vars = known

    def decode_complex_value(self, field_name: str, field: Any, value: Any) -> Any:
        return value  # already read as YAML


class _Sources(BaseSettings):
    """pydantic-settings' reading of ServiceConfig: keyword overrides, then the environment,
    then the file, merged key by key."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__",
                                      extra="forbid", coerce_numbers_to_str=True)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   **_: PydanticBaseSettingsSource
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        env, path = _LOADING.get()
        sources = [init_settings, _Environment(settings_cls, env)]
        if path is not None:
            toml = path.suffix == ".toml"
            try:
                source = (TomlConfigSettingsSource if toml else YamlConfigSettingsSource)(
                    settings_cls, path)
            except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
                raise ConfigError(f"{path}: not valid {'TOML' if toml else 'YAML'}: {exc}") from None
            except (AttributeError, TypeError, ValueError):  # a list or scalar at the top
                raise ConfigError(f"{path}: the top level must be a mapping") from None
            sources.append(source)
        return tuple(sources)


def _describe(error: ValidationError) -> str:
    """Each problem with the key it concerns (``limits.max_concurrent: ...``); a secret's
    value (anything under auth) is never repeated."""
    problems = []
    for e in error.errors():
        loc = [str(k) for k in e["loc"]]
        where = "".join(f"[{k}]" if k.isdigit() else f".{k}" for k in loc).lstrip(".")
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            parent = [k for k in loc[:-1] if not k.isdigit()]
            known = sorted(_section_fields(ServiceConfig, iter(parent)) or ())
            at = where.rpartition(".")[0] if "." in where else "config"
            problems.append(f"{at}: unknown key(s) {[loc[-1]]}; known: {known}")
        else:
            got = "" if loc[:1] == ["auth"] else f", got {e['input']!r}"
            why = str(e["ctx"]["error"]) if e["type"] == "value_error" else e["msg"]
            problems.append(f"{where or 'config'}: {why}{got}")
    return "; ".join(problems)


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
        raise ConfigError("limits.max_rss_bytes must be -1 (automatic: see server.limits), "
                          "0 (no limit) or a number of bytes")
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
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"configuration file {path} does not exist")
    loading = _LOADING.set((os.environ if env is None else env, path))
    try:
        settings = _Settings(**overrides)
        config = ServiceConfig(**{f.name: getattr(settings, f.name)
                                  for f in dataclasses.fields(ServiceConfig)})
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except SettingsError as exc:
        if isinstance(exc.__cause__, ConfigError):
            raise exc.__cause__ from None
        raise ConfigError(str(exc)) from None
    finally:
        _LOADING.reset(loading)
    return _validate(config)


_Settings = create_model("ServiceSettings", __base__=_Sources, **{
    f.name: (get_type_hints(ServiceConfig)[f.name], f.default)
    for f in dataclasses.fields(ServiceConfig)})
