"""The asyncio client over ``grpc.aio``: the same calls as ``Client``, awaited.

>>> async with AsyncClient("localhost:50051") as pl:
...     result = await pl.match("face.jpg")
...     async for event in pl.explain_stream("face.jpg", top_k=3):
...         print(event)

Each call is written once, in ``phenolens.client.Calls``; here they run on
``grpc.aio`` and are awaited.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from .client import Calls, ExplainEvents, T
from .results import ExplainedMatch, MatchResult


class AsyncClient(Calls):
    """A PhenoLens connection for asyncio code. Create it inside a running event loop.
    Every call of ``Client`` but ``iter_images`` and the syndrome calls, as a coroutine
    (``explain_stream``: an async iterator)."""

    _grpc = grpc.aio

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Any], request: Any, timeout: float | None,
                    read: Callable[[Any], T] | None = None, *, retry: bool = True) -> Any:
        tries = self._tries(timeout, retry)
        while True:
            try:
                response = await method(request, timeout=tries.remaining(),
                                        metadata=self._metadata)
            except grpc.RpcError as error:
                await asyncio.sleep(tries.wait_after(error))
                continue
            return response if read is None else read(response)

    async def _stream(self, start: Callable[[], tuple[Any, ExplainEvents]],
                      timeout: float | None) -> AsyncIterator[MatchResult | ExplainedMatch]:
        request, events = start()
        call = self._lens.ExplainStream(request, timeout=self._tries(timeout).remaining(),
                                        metadata=self._metadata)
        try:
            async for event in call:
                yield events(event)
        except grpc.RpcError as error:
            raise self._error(error) from None
        finally:
            call.cancel()


def _awaited(call: Callable[..., Any]) -> Callable[..., Any]:
    """``call`` as a coroutine function: nothing runs (not even the request's building)
    until it is awaited, as with any ``async def``."""

    @functools.wraps(call)
    async def method(self: AsyncClient, *args: Any, **kwargs: Any) -> Any:
        return await call(self, *args, **kwargs)

    return method


for _name, _method in vars(Calls).items():  # every unary call; explain_stream is a stream
    if not _name.startswith("_") and _name != "explain_stream":
        setattr(AsyncClient, _name, _awaited(_method))
