"""The synchronous client: ``Client(target, token=..., tls=...)``.

>>> from phenolens import Client
>>> with Client("localhost:50051", token="...") as pl:
...     result = pl.match("face.jpg", top_k=5)
...     best = pl.explain("face.jpg", top_k=1).explanations[0]
...     best.save_overlay("best.png")
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from . import requests as rq
from ._proto import gallery_pb2, gallery_pb2_grpc, phenolens_pb2, phenolens_pb2_grpc
from .arrays import ImageLike, LazyRGB, to_image, to_rgb
from .errors import PhenoLensError, from_rpc_error, is_admission_refusal, retry_after_s
from .results import (
    Encoding,
    ExplainedMatch,
    ExplainResult,
    GalleryImage,
    GalleryRecord,
    GalleryStats,
    ImportSummary,
    MatchResult,
    Page,
    ServerInfo,
)
from .syndrome import SyndromeMixin

T = TypeVar("T")


class EmptyResultWarning(UserWarning):
    """A match asked for gallery faces and got none: the server's gallery is empty, or the
    filters excluded every face."""


def warn_if_empty(result: MatchResult, top_k: int) -> MatchResult:
    """Say so (a warning, not a silent empty list) when a match asked for faces and got none."""
    if top_k > 0 and not result.hits:
        import warnings

        warnings.warn(f"no gallery face matched (gallery version {result.gallery_version}): "
                      "the server's gallery is empty, or the filters excluded every face",
                      EmptyResultWarning, stacklevel=2)
    return result
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _read(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


@dataclass(frozen=True)
class TLS:
    """Transport security. ``ca``: PEM of the CA that signed the server (None: system roots);
    ``cert``/``key``: the client's own certificate for mutual TLS; ``server_name``: override
    the name checked against the server certificate. PEM as bytes or a file path."""

    ca: bytes | str | Path | None = None
    cert: bytes | str | Path | None = None
    key: bytes | str | Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca), private_key=_read(self.key),
            certificate_chain=_read(self.cert),
        )


@dataclass(frozen=True)
class Retry:
    """Retries of a failed call: UNAVAILABLE, and RESOURCE_EXHAUSTED when the server was
    busy (see ``errors.is_admission_refusal``), at most ``attempts`` tries in all.

    Waits grow exponentially (base, 2*base, ... up to cap) with jitter, are never
    shorter than the server's retry hint, and never go past the caller's deadline.
    (gRPC's own retry policy in the channel's service config cannot keep this promise:
    it caps maxAttempts at 5, reads no ``retry-after-ms`` hint and cannot tell a busy
    server's RESOURCE_EXHAUSTED from a message too large.)
    """

    attempts: int = 6
    base_s: float = 0.1
    cap_s: float = 5.0

    def delay(self, error: grpc.RpcError, attempt: int, remaining_s: float | None
              ) -> float | None:
        """Seconds to wait before retrying after failed try ``attempt`` (0-based), or None
        when the call should fail now. remaining_s: time left to the caller's deadline."""
        if attempt + 1 >= self.attempts:
            return None
        if error.code() != grpc.StatusCode.UNAVAILABLE and not is_admission_refusal(error):
            return None
        wait = min(self.cap_s, self.base_s * 2**attempt) * random.uniform(0.5, 1.0)
        hint = retry_after_s(error)
        if hint is not None:
            wait = max(wait, hint * random.uniform(1.0, 1.5))
        if remaining_s is not None and wait >= remaining_s - 0.05:
            return None
        return wait


class Deadline:
    """The caller's deadline over several tries: ``remaining()`` seconds (None: none)."""

    def __init__(self, timeout: float | None) -> None:
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())


class Tries:
    """The tries of one call, shared by the blocking and the asyncio client: the timeout
    of each try (``remaining()``) and the wait before the next (``wait_after``)."""

    def __init__(self, retry: Retry | None, timeout: float | None,
                 to_error: Callable[[grpc.RpcError], PhenoLensError]) -> None:
        self.retry = retry
        self.deadline = Deadline(timeout)
        self.to_error = to_error
        self.attempt = 0

    def remaining(self) -> float | None:
        return self.deadline.remaining()

    def wait_after(self, error: grpc.RpcError, retryable: bool = True) -> float:
        """Seconds to sleep before the next try; raises the typed error when there is none."""
        delay = self.retry.delay(error, self.attempt, self.remaining()) \
            if retryable and self.retry is not None else None
        if delay is None:
            raise self.to_error(error) from None
        self.attempt += 1
        return delay


def channel_options(tls: TLS | bool | None, max_message_bytes: int) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if isinstance(tls, TLS) and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


def channel_credentials(tls: TLS | bool | None) -> grpc.ChannelCredentials | None:
    if tls is None or tls is False:
        return None
    return TLS().credentials() if tls is True else tls.credentials()


class ExplainEvents:
    """ExplainStream events -> the MatchResult, then each ExplainedMatch (carrying the
    query crop that the first event brought, and the query photo, decoded when drawn)."""

    def __init__(self, photo: LazyRGB | None) -> None:
        self.photo = photo
        self.crop = b""

    def __call__(self, event: phenolens_pb2.ExplainEvent) -> MatchResult | ExplainedMatch:
        self.crop = self.crop or event.query_crop_png
        if event.HasField("match"):
            return MatchResult.from_proto(event.match)
        return ExplainedMatch.from_proto(event.explanation, query_crop_png=self.crop,
                                         query_photo=self.photo)


class Calls:
    """Every PhenoLens call, written once for ``Client`` and ``AsyncClient``: each builds
    its request and reads its response here; the subclass's ``_call`` (blocking, or
    returning an awaitable) and ``_stream`` (an iterator, or an async one) run it."""

    _grpc: Any = grpc  # the module that makes channels: grpc, or grpc.aio

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls: TLS | bool | None = None,
        *,
        timeout: float | None = 60.0,
        retry: Retry | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """``options``: extra gRPC channel arguments, e.g. for several replicas
        ``Client("ipv4:10.0.0.1:50051,10.0.0.2:50051",
        options=[("grpc.lb_policy_name", "round_robin")])``."""
        options = [*channel_options(tls, max_message_bytes), *options]
        creds = channel_credentials(tls)
        self._channel = (self._grpc.secure_channel(target, creds, options=options) if creds
                         else self._grpc.insecure_channel(target, options=options))
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        self._retry = retry or Retry()
        self._no_client_cert = isinstance(tls, TLS) and tls.cert is None or tls is True
        self._lens = phenolens_pb2_grpc.PhenoLensStub(self._channel)
        self._gallery = gallery_pb2_grpc.GalleryAdminStub(self._channel)

    def _error(self, error: grpc.RpcError) -> PhenoLensError:
        return from_rpc_error(error, without_client_cert=self._no_client_cert)

    def _tries(self, timeout: float | None, retry: bool = True) -> Tries:
        return Tries(self._retry if retry else None,
                     self._timeout if timeout is None else timeout, self._error)

    def _call(self, method: Callable[..., Any], request: Any, timeout: float | None,
              read: Callable[[Any], T] | None = None, *, retry: bool = True) -> Any:
        raise NotImplementedError

    def _stream(self, start: Callable[[], tuple[Any, ExplainEvents]], timeout: float | None
                ) -> Any:
        raise NotImplementedError

    # -- matching ---------------------------------------------------------------------------
    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        return self._call(self._lens.GetServerInfo, phenolens_pb2.ServerInfoRequest(), timeout,
                          ServerInfo.from_proto)

    def encode(self, image: ImageLike, *, aligned: bool = False, return_crop: bool = False,
               timeout: float | None = None) -> Encoding:
        """Detect, align and embed one face; ``aligned=True`` skips detection for a crop."""
        request = phenolens_pb2.EncodeRequest(image=to_image(image, aligned=aligned),
                                              return_aligned_crop=return_crop)
        return self._call(self._lens.Encode, request, timeout, Encoding.from_proto)

    def match(self, image: ImageLike | None = None, *, aligned: bool = False,
              embedding: np.ndarray | None = None, view_scheme: str = "", top_k: int = 10,
              top_syndromes: int = 10, top_genes: int = 10, filters: rq.Filters | None = None,
              exclude_subjects: Sequence[str] = (), timeout: float | None = None) -> MatchResult:
        """Top-k gallery images and the syndrome and gene rankings for a face or embedding."""
        request = rq.match_request(image, aligned=aligned, embedding=embedding,
                                   view_scheme=view_scheme, top_k=top_k,
                                   top_syndromes=top_syndromes, top_genes=top_genes,
                                   filters=filters, exclude_subjects=exclude_subjects)
        return self._call(self._lens.Match, request, timeout,
                          lambda m: warn_if_empty(MatchResult.from_proto(m), top_k))

    def explain(self, image: ImageLike, *, aligned: bool = False, top_k: int = 3,
                methods: Sequence[str] = (), photo_maps: bool = True, overlays: bool = False,
                gallery_crops: bool = True, feature_maps: bool = False,
                gallery_ids: Sequence[str] = (), filters: rq.Filters | None = None,
                exclude_subjects: Sequence[str] = (),
                method_options: Mapping[str, Mapping[str, float]] | None = None,
                effects: int = 0, timeout: float | None = None) -> ExplainResult:
        """Match, then maps on both faces of every hit (see ExplainedMatch.save_overlay);
        ``effects``: region effects (``ExplainedMatch.effects``, the words of
        ``ExplainedMatch.describe``) for the first that many hits — about 70 forward passes a
        hit on the server, so not by default."""
        request = rq.explain_request(image, aligned=aligned, top_k=top_k, methods=methods,
                                     photo_maps=photo_maps, overlays=overlays,
                                     gallery_crops=gallery_crops, feature_maps=feature_maps,
                                     gallery_ids=gallery_ids, filters=filters,
                                     exclude_subjects=exclude_subjects,
                                     method_options=method_options, effects=effects)

        photo = LazyRGB(request.match.image) if photo_maps else None

        def read(response: phenolens_pb2.ExplainResponse) -> ExplainResult:
            return ExplainResult(
                warn_if_empty(MatchResult.from_proto(response.match),
                              0 if gallery_ids else top_k),
                tuple(ExplainedMatch.from_proto(e, query_crop_png=response.query_crop_png,
                                                query_photo=photo)
                      for e in response.explanations),
                response.query_crop_png,
            )

        return self._call(self._lens.Explain, request, timeout, read)

    def report(self, image: ImageLike, out: str | Path | None = None, *, aligned: bool = False,
               top_k: int = 3, title: str = "", methods: Sequence[str] = (),
               filters: rq.Filters | None = None, timeout: float | None = None) -> str:
        """A self-contained HTML match report (see ``phenolens.report``), also written to
        ``out`` when given. ``methods`` empty: the server's default explanation."""
        from .report import render_report

        request = rq.explain_request(image, aligned=aligned, top_k=top_k, methods=methods,
                                     photo_maps=False, filters=filters, effects=top_k)
        request.pair_figures = True

        def read(response: phenolens_pb2.ExplainResponse) -> str:
            page = render_report(ExplainResult.from_proto(response), to_rgb(image), title=title)
            if out is not None:
                Path(out).write_text(page, encoding="utf-8")
            return page

        return self._call(self._lens.Explain, request, timeout, read)

    def explain_stream(self, image: ImageLike, *, aligned: bool = False, top_k: int = 3,
                       methods: Sequence[str] = (), photo_maps: bool = True,
                       overlays: bool = False, gallery_crops: bool = True,
                       feature_maps: bool = False, gallery_ids: Sequence[str] = (),
                       filters: rq.Filters | None = None, exclude_subjects: Sequence[str] = (),
                       method_options: Mapping[str, Mapping[str, float]] | None = None,
                       effects: int = 0, timeout: float | None = None
                       ) -> Iterator[MatchResult | ExplainedMatch]:
        """Yields the MatchResult first, then each ExplainedMatch as the server finishes it.

        Closing the iterator early (``break``) cancels the call on the server. The blocking
        client retries (as ``Retry`` says) until the first event arrives; the asyncio
        client does not retry it.
        """

        def start() -> tuple[phenolens_pb2.ExplainRequest, ExplainEvents]:
            request = rq.explain_request(
                image, aligned=aligned, top_k=top_k, methods=methods, photo_maps=photo_maps,
                overlays=overlays, gallery_crops=gallery_crops, feature_maps=feature_maps,
                gallery_ids=gallery_ids, filters=filters, exclude_subjects=exclude_subjects,
                method_options=method_options, effects=effects)
            return request, ExplainEvents(LazyRGB(request.match.image) if photo_maps else None)

        return self._stream(start, timeout)

    # -- gallery ----------------------------------------------------------------------------
    def add_image(self, image: ImageLike, record: GalleryRecord | None = None, *,
                  aligned: bool = False, face_index: int | None = None,
                  timeout: float | None = None, **fields: Any) -> GalleryRecord:
        """Add one image (needs the admin scope). Metadata as a GalleryRecord or keywords
        (image_id=, subject_id=, syndrome_id=, syndrome_name=, omim=, genes=, source=).
        A photo with several faces is refused unless ``face_index`` picks one (0 = the most
        confident)."""
        if record is None:
            fields["genes"] = tuple(fields.get("genes", ()))
            record = GalleryRecord(gallery_id="", **fields)
        request = rq.add_image_request(image, record, aligned=aligned, face_index=face_index)
        return self._call(self._gallery.AddImage, request, timeout,
                          lambda r: GalleryRecord.from_proto(r.record))

    def import_gallery(self, items: Iterable[rq.ImportItem], *, timeout: float | None = None
                       ) -> ImportSummary:
        """Stream records to the server (admin scope); not retried, since items are consumed."""
        return self._call(self._gallery.ImportGallery, rq.import_records(items), timeout,
                          lambda s: ImportSummary(s.received, s.added, s.unchanged,
                                                  s.gallery_version), retry=False)

    def delete_images(self, gallery_ids: Sequence[str] = (), *, image_ids: Sequence[str] = (),
                      missing_ok: bool = False, timeout: float | None = None) -> int:
        request = gallery_pb2.DeleteImagesRequest(gallery_ids=list(gallery_ids),
                                                  image_ids=list(image_ids),
                                                  missing_ok=missing_ok)
        return self._call(self._gallery.DeleteImages, request, timeout, lambda r: r.deleted)

    def get_image(self, gallery_id: str, *, include_crop: bool = False,
                  include_embedding: bool = False, timeout: float | None = None) -> GalleryImage:
        request = gallery_pb2.GetImageRequest(gallery_id=gallery_id, include_crop=include_crop,
                                              include_embedding=include_embedding)
        return self._call(self._gallery.GetImage, request, timeout, GalleryImage.from_proto)

    def list_images(self, *, page_size: int = 100, page_token: str = "", syndrome_id: str = "",
                    subject_id: str = "", timeout: float | None = None) -> Page:
        request = gallery_pb2.ListImagesRequest(page_size=page_size, page_token=page_token,
                                                syndrome_id=syndrome_id, subject_id=subject_id)
        return self._call(self._gallery.ListImages, request, timeout, lambda r: Page(
            tuple(GalleryRecord.from_proto(x) for x in r.records), r.next_page_token, r.total))

    def gallery_stats(self, *, timeout: float | None = None) -> GalleryStats:
        return self._call(self._gallery.GalleryStats, gallery_pb2.GalleryStatsRequest(), timeout,
                          GalleryStats.from_proto)


class Client(SyndromeMixin, Calls):
    """A PhenoLens connection. Thread-safe; close it (or use ``with``) when done.

    ``timeout`` is the default deadline of each call in seconds (None: no deadline).
    Every failed call raises a ``phenolens.errors.PhenoLensError`` subclass.
    """

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., Any], request: Any, timeout: float | None,
              read: Callable[[Any], T] | None = None, *, retry: bool = True) -> Any:
        tries = self._tries(timeout, retry)
        while True:
            try:
                response = method(request, timeout=tries.remaining(), metadata=self._metadata)
            except grpc.RpcError as error:
                time.sleep(tries.wait_after(error))
                continue
            return response if read is None else read(response)

    def _stream(self, start: Callable[[], tuple[Any, ExplainEvents]], timeout: float | None
                ) -> Iterator[MatchResult | ExplainedMatch]:
        request, events = start()
        tries = self._tries(timeout)
        while True:
            call = self._lens.ExplainStream(request, timeout=tries.remaining(),
                                            metadata=self._metadata)
            received = 0
            try:
                for event in call:
                    received += 1
                    yield events(event)
                return
            except grpc.RpcError as error:
                time.sleep(tries.wait_after(error, retryable=received == 0))
            finally:
                call.cancel()

    def iter_images(self, *, page_size: int = 100, syndrome_id: str = "", subject_id: str = ""
                    ) -> Iterator[GalleryRecord]:
        """Every matching record, following page tokens."""
        token = ""
        while True:
            page = self.list_images(page_size=page_size, page_token=token,
                                    syndrome_id=syndrome_id, subject_id=subject_id)
            yield from page.records
            token = page.next_page_token
            if not token:
                return


__all__ = ["Client", "TLS", "Retry", "Deadline", "PhenoLensError"]
