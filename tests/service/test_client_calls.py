"""The blocking and asyncio clients share their calls (phenolens.client.Calls) and their
retries (phenolens.client.Tries); no server needed here (test_rpcs and test_errors run
both against a real one)."""

from __future__ import annotations

import asyncio
import inspect

import grpc
import phenolens
import pytest
from phenolens.client import Calls, Retry, Tries
from phenolens.errors import RETRY_AFTER_KEY, from_rpc_error


class Refusal(grpc.RpcError):
    """An RpcError as grpcio raises it: a status code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str = "", metadata=()) -> None:
        self._code, self._details, self._metadata = code, details, tuple(metadata)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return self._metadata


def test_async_client_offers_every_call_of_the_blocking_one_as_a_coroutine():
    def public(cls):
        return {n for n in dir(cls) if not n.startswith("_")}

    sync_only = {"iter_images", "composite", "syndrome_map", "fill_in", "fill_in_stream"}
    assert public(phenolens.AsyncClient) == public(phenolens.Client) - sync_only
    for name in public(Calls) - {"explain_stream"}:
        method = getattr(phenolens.AsyncClient, name)
        assert inspect.iscoroutinefunction(method), name
        assert inspect.signature(method) == inspect.signature(getattr(phenolens.Client, name))


def test_nothing_runs_before_an_async_call_is_awaited_or_iterated():
    async def run() -> None:
        async with phenolens.AsyncClient("127.0.0.1:1", timeout=1) as client:
            pending = client.match(None)  # invalid, but not built until awaited
            stream = client.explain_stream(None)
            with pytest.raises(ValueError, match="exactly one of image and embedding"):
                await pending
            with pytest.raises(ValueError, match="exactly one of image and embedding"):
                await stream.__anext__()

    blocking = phenolens.Client("127.0.0.1:1", timeout=1).explain_stream(None)
    with pytest.raises(ValueError, match="exactly one of image and embedding"):
        next(blocking)

    asyncio.run(run())


def test_tries_wait_for_unavailable_and_busy_and_give_up_with_the_typed_error():
    tries = Tries(Retry(attempts=3, base_s=0.01, cap_s=0.02), 10.0, from_rpc_error)
    assert 0.005 <= tries.wait_after(Refusal(grpc.StatusCode.UNAVAILABLE)) <= 0.01
    busy = Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", [(RETRY_AFTER_KEY, "200")])
    assert 0.2 <= tries.wait_after(busy) <= 0.3, "never shorter than the server's hint"
    with pytest.raises(phenolens.Unavailable):
        tries.wait_after(Refusal(grpc.StatusCode.UNAVAILABLE))  # the third try was the last


@pytest.mark.parametrize("error", [
    Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "message too large"),  # no hint: not busy
    Refusal(grpc.StatusCode.INVALID_ARGUMENT, "no face"),
])
def test_tries_never_retry_what_a_retry_cannot_fix(error):
    with pytest.raises(phenolens.PhenoLensError) as raised:
        Tries(Retry(), 10.0, from_rpc_error).wait_after(error)
    assert raised.value.code == error.code()


def test_tries_stop_where_the_next_wait_would_pass_the_deadline_or_retrying_is_off():
    slow = Retry(attempts=5, base_s=1.0, cap_s=1.0)
    with pytest.raises(phenolens.Unavailable):
        Tries(slow, 0.3, from_rpc_error).wait_after(Refusal(grpc.StatusCode.UNAVAILABLE))
    with pytest.raises(phenolens.Unavailable):
        Tries(None, 10.0, from_rpc_error).wait_after(Refusal(grpc.StatusCode.UNAVAILABLE))
    with pytest.raises(phenolens.Unavailable):
        Tries(Retry(), 10.0, from_rpc_error).wait_after(Refusal(grpc.StatusCode.UNAVAILABLE),
                                                         retryable=False)
