"""The asyncio client over ``grpc.aio``: the same calls as ``Client``, awaited.

>>> async with AsyncClient("localhost:50051") as pl:
...     result = await pl.match("face.jpg")
...     async for event in pl.explain_stream("face.jpg", top_k=3):
...         print(event)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import numpy as np

from . import requests as rq
from ._proto import gallery_pb2, gallery_pb2_grpc, phenolens_pb2, phenolens_pb2_grpc
from .arrays import ImageLike, to_image, to_rgb
from .client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    TLS,
    Deadline,
    Retry,
    channel_credentials,
    channel_options,
)
from .errors import from_rpc_error
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

T = TypeVar("T")


class AsyncClient:
    """A PhenoLens connection for asyncio code. Create it inside a running event loop."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls: TLS | bool | None = None,
        *,
        timeout: float | None = 60.0,
        retry: Retry | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        options = channel_options(tls, max_message_bytes)
        creds = channel_credentials(tls)
        self._channel = (grpc.aio.secure_channel(target, creds, options=options) if creds
                         else grpc.aio.insecure_channel(target, options=options))
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        self._retry = retry or Retry()
        self._no_client_cert = isinstance(tls, TLS) and tls.cert is None or tls is True
        self._lens = phenolens_pb2_grpc.PhenoLensStub(self._channel)
        self._gallery = gallery_pb2_grpc.GalleryAdminStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any,
                    timeout: float | None) -> T:
        deadline = Deadline(self._timeout if timeout is None else timeout)
        attempt = 0
        while True:
            try:
                return await method(request, timeout=deadline.remaining(),
                                    metadata=self._metadata)
            except grpc.RpcError as error:
                delay = self._retry.delay(error, attempt, deadline.remaining())
                if delay is None:
                    raise from_rpc_error(error, without_client_cert=self._no_client_cert) \
                        from None
                await asyncio.sleep(delay)
                attempt += 1

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        return ServerInfo.from_proto(
            await self._call(self._lens.GetServerInfo, phenolens_pb2.ServerInfoRequest(), timeout))

    async def encode(self, image: ImageLike, *, aligned: bool = False, return_crop: bool = False,
                     timeout: float | None = None) -> Encoding:
        request = phenolens_pb2.EncodeRequest(image=to_image(image, aligned=aligned),
                                              return_aligned_crop=return_crop)
        return Encoding.from_proto(await self._call(self._lens.Encode, request, timeout))

    async def match(self, image: ImageLike | None = None, *, aligned: bool = False,
                    embedding: np.ndarray | None = None, view_scheme: str = "",
                    top_k: int = 10, top_syndromes: int = 10, top_genes: int = 10,
                    filters: rq.Filters | None = None, exclude_subjects: Sequence[str] = (),
                    timeout: float | None = None) -> MatchResult:
        request = rq.match_request(image, aligned=aligned, embedding=embedding,
                                   view_scheme=view_scheme, top_k=top_k,
                                   top_syndromes=top_syndromes, top_genes=top_genes,
                                   filters=filters, exclude_subjects=exclude_subjects)
        return MatchResult.from_proto(await self._call(self._lens.Match, request, timeout))

    async def explain(self, image: ImageLike, *, aligned: bool = False, top_k: int = 3,
                      methods: Sequence[str] = (), photo_maps: bool = True,
                      overlays: bool = False, gallery_crops: bool = True,
                      feature_maps: bool = False, gallery_ids: Sequence[str] = (),
                      filters: rq.Filters | None = None, exclude_subjects: Sequence[str] = (),
                      method_options: Mapping[str, Mapping[str, float]] | None = None,
                      timeout: float | None = None) -> ExplainResult:
        request = rq.explain_request(image, aligned=aligned, top_k=top_k, methods=methods,
                                     photo_maps=photo_maps, overlays=overlays,
                                     gallery_crops=gallery_crops, feature_maps=feature_maps,
                                     gallery_ids=gallery_ids, filters=filters,
                                     exclude_subjects=exclude_subjects,
                                     method_options=method_options)
        response = await self._call(self._lens.Explain, request, timeout)
        photo = to_rgb(image) if photo_maps else None
        return ExplainResult(
            MatchResult.from_proto(response.match),
            tuple(ExplainedMatch.from_proto(e, query_crop_png=response.query_crop_png,
                                            query_photo=photo) for e in response.explanations),
            response.query_crop_png,
        )

    async def report(self, image: ImageLike, out: str | Path | None = None, *,
                     aligned: bool = False, top_k: int = 3, title: str = "",
                     methods: Sequence[str] = (), filters: rq.Filters | None = None,
                     timeout: float | None = None) -> str:
        """As ``Client.report``: a self-contained HTML match report (also written to ``out``)."""
        from .report import render_report

        request = rq.explain_request(image, aligned=aligned, top_k=top_k, methods=methods,
                                     photo_maps=False, filters=filters)
        request.pair_figures = True
        result = ExplainResult.from_proto(await self._call(self._lens.Explain, request, timeout))
        page = render_report(result, to_rgb(image), title=title)
        if out is not None:
            Path(out).write_text(page, encoding="utf-8")
        return page

    async def explain_stream(self, image: ImageLike, *, aligned: bool = False, top_k: int = 3,
                             methods: Sequence[str] = (), photo_maps: bool = True,
                             overlays: bool = False, gallery_crops: bool = True,
                             feature_maps: bool = False, gallery_ids: Sequence[str] = (),
                             filters: rq.Filters | None = None,
                             exclude_subjects: Sequence[str] = (),
                             method_options: Mapping[str, Mapping[str, float]] | None = None,
                             timeout: float | None = None
                             ) -> AsyncIterator[MatchResult | ExplainedMatch]:
        """Yields the MatchResult, then each ExplainedMatch as it is ready (not retried)."""
        request = rq.explain_request(image, aligned=aligned, top_k=top_k, methods=methods,
                                     photo_maps=photo_maps, overlays=overlays,
                                     gallery_crops=gallery_crops, feature_maps=feature_maps,
                                     gallery_ids=gallery_ids, filters=filters,
                                     exclude_subjects=exclude_subjects,
                                     method_options=method_options)
        photo = to_rgb(image) if photo_maps else None
        timeout = self._timeout if timeout is None else timeout
        call = self._lens.ExplainStream(request, timeout=timeout, metadata=self._metadata)
        crop = b""
        try:
            async for event in call:
                crop = crop or event.query_crop_png
                if event.HasField("match"):
                    yield MatchResult.from_proto(event.match)
                else:
                    yield ExplainedMatch.from_proto(event.explanation, query_crop_png=crop,
                                                    query_photo=photo)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def add_image(self, image: ImageLike, record: GalleryRecord | None = None, *,
                        aligned: bool = False, face_index: int | None = None,
                        timeout: float | None = None, **fields: Any) -> GalleryRecord:
        if record is None:
            fields["genes"] = tuple(fields.get("genes", ()))
            record = GalleryRecord(gallery_id="", **fields)
        response = await self._call(self._gallery.AddImage,
                                    rq.add_image_request(image, record, aligned=aligned,
                                                         face_index=face_index), timeout)
        return GalleryRecord.from_proto(response.record)

    async def import_gallery(self, items: Iterable[rq.ImportItem], *,
                             timeout: float | None = None) -> ImportSummary:
        timeout = self._timeout if timeout is None else timeout
        try:
            s = await self._gallery.ImportGallery(rq.import_records(items), timeout=timeout,
                                                  metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return ImportSummary(s.received, s.added, s.unchanged, s.gallery_version)

    async def delete_images(self, gallery_ids: Sequence[str] = (), *,
                            image_ids: Sequence[str] = (), missing_ok: bool = False,
                            timeout: float | None = None) -> int:
        request = gallery_pb2.DeleteImagesRequest(gallery_ids=list(gallery_ids),
                                                  image_ids=list(image_ids),
                                                  missing_ok=missing_ok)
        return (await self._call(self._gallery.DeleteImages, request, timeout)).deleted

    async def get_image(self, gallery_id: str, *, include_crop: bool = False,
                        include_embedding: bool = False, timeout: float | None = None
                        ) -> GalleryImage:
        request = gallery_pb2.GetImageRequest(gallery_id=gallery_id, include_crop=include_crop,
                                              include_embedding=include_embedding)
        return GalleryImage.from_proto(await self._call(self._gallery.GetImage, request, timeout))

    async def list_images(self, *, page_size: int = 100, page_token: str = "",
                          syndrome_id: str = "", subject_id: str = "",
                          timeout: float | None = None) -> Page:
        request = gallery_pb2.ListImagesRequest(page_size=page_size, page_token=page_token,
                                                syndrome_id=syndrome_id, subject_id=subject_id)
        r = await self._call(self._gallery.ListImages, request, timeout)
        return Page(tuple(GalleryRecord.from_proto(x) for x in r.records), r.next_page_token,
                    r.total)

    async def gallery_stats(self, *, timeout: float | None = None) -> GalleryStats:
        return GalleryStats.from_proto(await self._call(
            self._gallery.GalleryStats, gallery_pb2.GalleryStatsRequest(), timeout))
