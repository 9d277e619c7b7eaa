"""The explain use case, once: match a query, explain the hits, present them.

The Explain and ExplainStream RPCs (``server.servicer``), ``phenolens report`` and
``phenolens explain --gallery`` (``server.commands``) all call ``explain_query``;
each only builds the query and the ``ExplainAsk`` and converts or writes what comes
back. With ``--server`` the CLI goes through the client to a server, which runs this.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from gallery import SearchFilter
from server.backend import Backend, MatchOutcome, Query
from server.limits import RequestScope
from server.present import (
    Presentation,
    PresentedMatch,
    display_photo,
    present_match,
    query_crop_png,
)


@dataclass(frozen=True)
class ExplainAsk:
    """What to match and explain: ``methods`` (checked names) with their ``options``; the
    ``top_k`` hits, or the chosen ``gallery_ids`` instead (scored against the query);
    syndrome and gene rankings of ``top_syndromes``/``top_genes``; region effects for
    the first ``effects`` hits; what to draw (``presentation``). ``skip_uncropped``:
    leave out hits whose gallery image has no stored crop (their rank kept) instead
    of refusing the call."""

    methods: tuple[str, ...]
    options: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    top_k: int = 3
    top_syndromes: int = 10
    top_genes: int = 10
    filters: SearchFilter = field(default_factory=SearchFilter)
    gallery_ids: tuple[int, ...] = ()
    effects: int = 0
    presentation: Presentation = field(default_factory=Presentation)
    skip_uncropped: bool = False


@dataclass(frozen=True, eq=False)
class ExplainedQuery:
    """The match (its hits are the explained ones: the top k or the chosen images), the
    query's crop PNG when the pictures need it, and the explained hits in rank order,
    each computed as the iterator reaches it (so a consumer can stream them)."""

    outcome: MatchOutcome
    query_crop_png: bytes
    matches: Iterator[PresentedMatch]


def explain_query(backend: Backend, query: Query, ask: ExplainAsk,
                  scope: RequestScope) -> ExplainedQuery:
    """Match ``query`` (which must come from an image) against the gallery, then explain and
    present its hits as ``ask`` says, under ``scope``'s deadline and cancellation."""
    outcome = backend.match(query, top_k=ask.top_k, top_syndromes=ask.top_syndromes,
                            top_genes=ask.top_genes, filters=ask.filters, scope=scope)
    if ask.gallery_ids:
        outcome = outcome.with_hits(backend.hits_by_id(ask.gallery_ids, query))
    positions = list(range(len(outcome.hits)))
    if ask.skip_uncropped:
        positions = [i for i in positions
                     if backend.gallery.get(outcome.hits[i].gallery_id).crop_png]
    return ExplainedQuery(outcome, query_crop_png(query.face, ask.presentation),
                          _explained(backend, outcome, positions, ask, scope))


def _explained(backend: Backend, outcome: MatchOutcome, positions: Sequence[int],
               ask: ExplainAsk, scope: RequestScope) -> Iterator[PresentedMatch]:
    """The hits at ``positions`` of the outcome, explained and presented one by one."""
    query = outcome.query
    photo = display_photo(query.photo, ask.presentation,
                          backend.config.limits.max_photo_map_side)
    hits = [outcome.hits[i] for i in positions]
    for explained in backend.explain(query, hits, methods=ask.methods, options=ask.options,
                                     photo_maps=ask.presentation.photo_maps, scope=scope,
                                     effects=min(ask.effects, len(hits))):
        scope.check()
        at = positions[explained.index]
        yield present_match(explained, rank=at + 1, confidence=outcome.hit_confidences[at],
                            query_crop=query.face.crop, query_photo=photo,
                            presentation=ask.presentation)
