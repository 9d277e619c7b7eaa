"""Client calls of phenolens.v1.SyndromeService: composites, syndrome-wise maps, fill-in.

>>> from phenolens import Client
>>> from phenolens.syndrome import SyndromeClient
>>> with Client("localhost:50051", token="...") as pl:
...     syn = SyndromeClient(pl)
...     comp = syn.composite(syndrome_id="OMIM:123")
...     maps = syn.syndrome_map(syndrome_id="OMIM:123", query="face.jpg")
...     result = syn.fill_in("face.jpg", syndrome_id="OMIM:123", count=32)

``SyndromeMixin`` offers the same methods on any class with ``_channel``,
``_metadata``, ``_timeout`` and ``_call`` (as ``phenolens.Client`` has).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from ._proto import syndrome_pb2, syndrome_pb2_grpc, types_pb2
from .arrays import ImageLike, from_float_array, optional_array, to_image
from .errors import from_rpc_error


def _pixels(message: types_pb2.RawPixels) -> np.ndarray | None:
    if not message.data:
        return None
    return np.frombuffer(message.data, np.uint8).reshape(
        message.height, message.width, message.channels).copy()


@dataclass(frozen=True)
class GroupSummary:
    label: str
    images: int
    subjects: int
    warnings: tuple[str, ...]
    gallery_ids: tuple[str, ...]

    @classmethod
    def from_proto(cls, m: syndrome_pb2.GroupSummary) -> GroupSummary:
        return cls(m.label, m.images, m.subjects, tuple(m.warnings), tuple(m.gallery_ids))


@dataclass(frozen=True)
class CompositeResult:
    """image (H, W, 3) uint8 composite; mean (H, W, 3) float32 before rounding."""

    group: GroupSummary
    image: np.ndarray
    mean: np.ndarray
    png: bytes

    @classmethod
    def from_proto(cls, m: syndrome_pb2.CompositeResponse) -> CompositeResult:
        return cls(GroupSummary.from_proto(m.group), _pixels(m.composite),
                   from_float_array(m.mean), m.composite_png)


@dataclass(frozen=True)
class MemberMap:
    gallery_id: str
    cosine_to_centroid: float
    cosine_to_rest: float
    to_centroid: np.ndarray
    to_rest: np.ndarray


@dataclass(frozen=True)
class QueryPull:
    """map (h, w), aligned (H, W): regions pulling the query towards (+) the syndrome."""

    cosine: float
    view_cosines: tuple[float, ...]
    map: np.ndarray
    aligned: np.ndarray
    bias_share: float
    residual: float
    overlay_png: bytes


@dataclass(frozen=True)
class SyndromeMapResult:
    """Mean member maps towards the centroid and the rest ((h, w) and aligned (H, W))."""

    group: GroupSummary
    to_centroid: np.ndarray
    to_rest: np.ndarray
    to_centroid_aligned: np.ndarray
    to_rest_aligned: np.ndarray
    mean_cosine_to_centroid: float
    mean_cosine_to_rest: float
    members: tuple[MemberMap, ...]
    query: QueryPull | None
    centroid: np.ndarray
    composite_png: bytes
    to_centroid_overlay_png: bytes
    to_rest_overlay_png: bytes

    @classmethod
    def from_proto(cls, m: syndrome_pb2.SyndromeMapResponse) -> SyndromeMapResult:
        query = None
        if m.HasField("query"):
            q = m.query
            query = QueryPull(q.cosine, tuple(q.view_cosines), from_float_array(q.map),
                              from_float_array(q.aligned), q.bias_share, q.residual,
                              q.overlay_png)
        return cls(
            GroupSummary.from_proto(m.group), from_float_array(m.to_centroid),
            from_float_array(m.to_rest), from_float_array(m.to_centroid_aligned),
            from_float_array(m.to_rest_aligned), m.mean_cosine_to_centroid,
            m.mean_cosine_to_rest,
            tuple(MemberMap(x.gallery_id, x.cosine_to_centroid, x.cosine_to_rest,
                            from_float_array(x.to_centroid), from_float_array(x.to_rest))
                  for x in m.members),
            query, from_float_array(m.centroid), m.composite_png, m.to_centroid_overlay_png,
            m.to_rest_overlay_png)


@dataclass(frozen=True)
class FillInConsistency:
    masked: np.ndarray
    filled: np.ndarray
    control: np.ndarray
    fraction_improved: float
    mean_gain: float
    control_fraction_improved: float
    control_mean_gain: float
    consistent: bool


@dataclass(frozen=True)
class FillInResult:
    """gradient/update (H, W, 3); magnitude (H, W); images (H, W, 3) uint8."""

    target_label: str
    score: float
    score_updated: float
    gradient: np.ndarray
    magnitude: np.ndarray
    update: np.ndarray
    crop: np.ndarray | None
    filled: np.ndarray
    expected_fill: np.ndarray
    example_masked: np.ndarray
    example_filled: np.ndarray
    consistency: FillInConsistency
    forward_passes: int
    seconds: float
    figure_png: bytes

    @classmethod
    def from_proto(cls, m: syndrome_pb2.FillInResult) -> FillInResult:
        c = m.consistency
        return cls(
            m.target_label, m.score, m.score_updated, from_float_array(m.gradient),
            from_float_array(m.magnitude), from_float_array(m.update), _pixels(m.crop),
            _pixels(m.filled), _pixels(m.expected_fill), _pixels(m.example_masked),
            _pixels(m.example_filled),
            FillInConsistency(optional_array(c.masked), optional_array(c.filled),
                              optional_array(c.control), c.fraction_improved, c.mean_gain,
                              c.control_fraction_improved, c.control_mean_gain, c.consistent),
            m.forward_passes, m.seconds, m.figure_png)


@dataclass(frozen=True)
class FillInProgress:
    done: int
    total: int


def group_message(syndrome_id: str = "", gallery_ids: Sequence[str] = (), *,
                  exclude_subjects: Sequence[str] = (), min_size: int = 0,
                  balance_subjects: bool = False) -> syndrome_pb2.Group:
    return syndrome_pb2.Group(syndrome_id=syndrome_id, gallery_ids=[str(g) for g in gallery_ids],
                              exclude_subject_ids=list(exclude_subjects), min_size=min_size,
                              balance_subjects=balance_subjects)


class SyndromeMixin:
    """SyndromeService calls for a class with ``_channel``, ``_metadata``, ``_timeout``, ``_call``."""

    _channel: grpc.Channel
    _metadata: tuple
    _timeout: float | None
    _call: Callable

    @property
    def _syndromes(self) -> syndrome_pb2_grpc.SyndromeServiceStub:
        stub = self.__dict__.get("_syndrome_stub")
        if stub is None:
            stub = syndrome_pb2_grpc.SyndromeServiceStub(self._channel)
            self.__dict__["_syndrome_stub"] = stub
        return stub

    def composite(self, syndrome_id: str = "", gallery_ids: Sequence[str] = (), *,
                  exclude_subjects: Sequence[str] = (), min_size: int = 0,
                  balance_subjects: bool = False, timeout: float | None = None
                  ) -> CompositeResult:
        """The mean aligned face of a syndrome (or of chosen gallery images)."""
        request = syndrome_pb2.CompositeRequest(group=group_message(
            syndrome_id, gallery_ids, exclude_subjects=exclude_subjects, min_size=min_size,
            balance_subjects=balance_subjects))
        return CompositeResult.from_proto(self._call(self._syndromes.Composite, request, timeout))

    def syndrome_map(self, syndrome_id: str = "", gallery_ids: Sequence[str] = (), *,
                     query: ImageLike | None = None, aligned: bool = False,
                     members: bool = False, overlays: bool = False,
                     exclude_subjects: Sequence[str] = (), min_size: int = 0,
                     timeout: float | None = None) -> SyndromeMapResult:
        """Syndrome-wise maps; with ``query``, also the regions pulling it towards the group."""
        request = syndrome_pb2.SyndromeMapRequest(
            group=group_message(syndrome_id, gallery_ids, exclude_subjects=exclude_subjects,
                                min_size=min_size),
            members=members, overlays=overlays)
        if query is not None:
            request.query.CopyFrom(to_image(query, aligned=aligned))
        return SyndromeMapResult.from_proto(self._call(self._syndromes.SyndromeMap, request,
                                                       timeout))

    def fill_in_stream(self, image: ImageLike, *, syndrome_id: str = "",
                       gallery_ids: Sequence[str] = (), gallery_id: str = "",
                       target_image: ImageLike | None = None, aligned: bool = False,
                       masks: str = "", count: int = 0, ratio: float = 0.0, patch: int = 0,
                       fill: str = "", step: float = 0.0, steps: int = 0,
                       threshold: float = 0.0, seed: int = 0, overlays: bool = False,
                       timeout: float | None = None
                       ) -> Iterator[FillInProgress | FillInResult]:
        """Yields FillInProgress while masks are processed, then the FillInResult.
        Target: a syndrome (``syndrome_id``/``gallery_ids``), one ``gallery_id`` or
        ``target_image``. Zero/empty options take the server's defaults. Closing the
        iterator early cancels the call on the server."""
        request = syndrome_pb2.FillInRequest(
            image=to_image(image, aligned=aligned), overlays=overlays,
            options=syndrome_pb2.FillInOptions(masks=masks, count=count, ratio=ratio,
                                               patch=patch, fill=fill, step=step, steps=steps,
                                               threshold=threshold, seed=seed))
        if target_image is not None:
            request.target_image.CopyFrom(to_image(target_image, aligned=aligned))
        elif gallery_id:
            request.gallery_id = str(gallery_id)
        else:
            request.syndrome.CopyFrom(group_message(syndrome_id, gallery_ids, min_size=1))
        timeout = self._timeout if timeout is None else timeout
        call = self._syndromes.FillIn(request, timeout=timeout, metadata=self._metadata)
        try:
            for event in call:
                if event.HasField("progress"):
                    yield FillInProgress(event.progress.done, event.progress.total)
                else:
                    yield FillInResult.from_proto(event.result)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    def fill_in(self, image: ImageLike, **kwargs) -> FillInResult:
        """:meth:`fill_in_stream` to its end; returns the FillInResult."""
        result = None
        for event in self.fill_in_stream(image, **kwargs):
            if isinstance(event, FillInResult):
                result = event
        if result is None:
            raise RuntimeError("the server ended FillIn without a result")
        return result


class SyndromeClient(SyndromeMixin):
    """SyndromeService calls over an open ``phenolens.Client`` (shares its channel,
    token, default deadline and retry policy)."""

    def __init__(self, client: object) -> None:
        self._client = client
        self._channel = client._channel  # type: ignore[attr-defined]
        self._metadata = client._metadata  # type: ignore[attr-defined]
        self._timeout = client._timeout  # type: ignore[attr-defined]
        self._call = client._call  # type: ignore[attr-defined]


__all__ = [
    "CompositeResult", "FillInConsistency", "FillInProgress", "FillInResult", "GroupSummary",
    "MemberMap", "QueryPull", "SyndromeClient", "SyndromeMapResult", "SyndromeMixin",
]
