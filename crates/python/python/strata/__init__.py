"""strata: a tiered cache for LLM responses (memory, local disk, S3), in process.

    from strata import Cache
    with Cache(disk_path="/tmp/strata") as cache:
        answer = cache.get_or_call(request, lambda: call_the_model(request))

Requests and responses are dicts (or JSON ``str``/``bytes``, taken as they are). The engine is
Rust (``strata._native``); lookups and all I/O run with the GIL released. Adapters for LangChain
(``strata.langchain``), LiteLLM and DSPy import their framework only when used.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import threading
from typing import Any, Callable, Optional

from ._native import Engine, StrataError

try:  # orjson (a dependency of the package) writes and reads JSON several times faster
    import orjson as _orjson
except ImportError:  # pragma: no cover - a source install without it still works
    _orjson = None

__all__ = ["Cache", "Hit", "StrataError"]


def _json(value: Any, what: str) -> bytes:
    """JSON as UTF-8 bytes (what the engine reads)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    try:
        if _orjson is not None:
            return _orjson.dumps(value, option=_orjson.OPT_NON_STR_KEYS)
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} cannot be stored as JSON: {e}") from None


class Hit(dict):
    """A response from the cache (a dict), with ``outcome``: ``L1``, ``L2``, ``L3``,
    ``Coalesced``, ``Miss`` or ``Uncacheable``."""

    outcome: str = ""


_loads = _orjson.loads if _orjson is not None else json.loads


def _hit(text: str, outcome: str) -> Any:
    value = _loads(text)
    if isinstance(value, dict):
        value = Hit(value)
        value.outcome = outcome
    return value


class Cache:
    """The cache of a configuration: the embedded default, ``config`` (a TOML file) if given,
    ``STRATA_*`` environment variables, then keyword overrides named ``section_key``
    (``disk_path="/tmp/strata"``, ``memory_capacity="64 MiB"``, ``s3_enabled=True``).

    A context manager: leaving it closes the cache (drains uploads, flushes the disk tier).
    """

    def __init__(self, config: Optional[str] = None, **overrides: Any) -> None:
        self._engine = Engine(config, json.dumps(overrides) if overrides else None)
        self._flights: dict = {}
        self._flights_lock = threading.Lock()

    # -- lookups ---------------------------------------------------------------------------

    def key(self, request: Any, *, user=None, session=None, namespace=None) -> str:
        """The display key of a request, as ``strata explain`` prints it."""
        return self._engine.key(_json(request, "the request"), user, session, namespace)

    def get(self, request: Any, *, user=None, session=None, namespace=None) -> Optional[Any]:
        """The cached response, or ``None``."""
        found = self._engine.get(_json(request, "the request"), user, session, namespace)
        return None if found is None else _loads(found[0])

    def lookup(self, request: Any, *, user=None, session=None, namespace=None) -> Optional[Any]:
        """``get``, the response a :class:`Hit` that says which tier answered (``L1``…)."""
        found = self._engine.get(_json(request, "the request"), user, session, namespace)
        return None if found is None else _hit(*found)

    def put(self, request: Any, response: Any, *, user=None, session=None, namespace=None,
            provider: Optional[str] = None, cost_usd: Optional[float] = None,
            tags: Optional[list] = None, ttl: Optional[float] = None,
            latency_ms: Optional[int] = None) -> None:
        """Stores ``response`` for ``request`` (``ttl`` in seconds)."""
        self._engine.put(_json(request, "the request"), _json(response, "the response"),
                         user, session, namespace, provider, cost_usd,
                         list(tags) if tags is not None else None, ttl, latency_ms)

    def get_or_call(self, request: Any, fn: Callable[[], Any], *, user=None, session=None,
                    namespace=None, provider: Optional[str] = None,
                    cost_usd: Optional[float] = None, tags: Optional[list] = None,
                    ttl: Optional[float] = None) -> Any:
        """The cached response, or ``fn()``'s, stored. ``fn`` runs only on a miss, and once for
        concurrent identical calls from any number of threads; its exception reaches each."""
        meta = {"provider": provider, "cost_usd": cost_usd, "tags": tags, "ttl": ttl}

        def produce():
            return _json(fn(), "the response").decode("utf-8"), meta

        text, outcome = self._engine.get_or_call(_json(request, "the request"), produce,
                                                 user, session, namespace)
        return _hit(text, outcome)

    async def aget_or_call(self, request: Any, fn: Callable[[], Any], *, user=None,
                           session=None, namespace=None, provider: Optional[str] = None,
                           cost_usd: Optional[float] = None, tags: Optional[list] = None,
                           ttl: Optional[float] = None) -> Any:
        """``get_or_call`` for asyncio: ``fn`` is an async function. Identical calls from any
        number of tasks share one call of ``fn``; lookups run in a worker thread."""
        request_text = _json(request, "the request")
        scope = (user, session, namespace)
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, lambda: self._engine.get(request_text, *scope))
        if found is not None:
            return _hit(*found)
        try:
            flight_key = (self._engine.key(request_text, *scope), id(loop))
        except ValueError:
            flight_key = None  # not keyable: called uncached, alone
        if flight_key is not None:
            with self._flights_lock:
                shared = self._flights.get(flight_key)
                leader = shared is None
                if leader:
                    shared = loop.create_future()
                    self._flights[flight_key] = shared
            if not leader:
                text, _ = await asyncio.shield(shared)
                return _hit(text, "Coalesced")
        try:
            response = await fn()
            text = _json(response, "the response")
            if flight_key is not None:
                await loop.run_in_executor(None, lambda: self._engine.put(
                    request_text, text, user, session, namespace, provider, cost_usd,
                    list(tags) if tags is not None else None, ttl, None))
            if flight_key is not None and not shared.done():
                shared.set_result((text, "Miss"))
            return _hit(text, "Miss")
        except BaseException as e:
            if flight_key is not None and not shared.done():
                shared.set_exception(e)
                shared.exception()  # retrieved: no "never retrieved" warning if none waits
            raise
        finally:
            if flight_key is not None:
                with self._flights_lock:
                    if self._flights.get(flight_key) is shared:
                        del self._flights[flight_key]

    # -- the decorator ----------------------------------------------------------------------

    def cached(self, ttl: Optional[float] = None, key: Optional[Callable[..., str]] = None,
               tags: Optional[list] = None):
        """Caches a function's results (sync or async) under ``key(*args, **kwargs)``, by
        default its qualified name and its arguments as JSON. Values round-trip through JSON;
        one that cannot raises ``TypeError`` at the first call."""

        def decorate(fn):
            name = f"{fn.__module__}.{fn.__qualname__}"

            def key_of(args, kwargs) -> str:
                if key is not None:
                    return f"{name}:{key(*args, **kwargs)}"
                try:
                    return f"{name}:{json.dumps([args, kwargs], sort_keys=True, separators=(',', ':'))}"
                except (TypeError, ValueError) as e:
                    raise TypeError(f"{name}: its arguments cannot make a key ({e}); pass key=") from None

            def store(value: Any) -> str:
                text = _json(value, f"{name}'s value").decode("utf-8")
                if json.loads(text) != value:
                    raise TypeError(f"{name}'s value does not round-trip through JSON")
                return text

            tag_list = list(tags) if tags is not None else None

            if inspect.iscoroutinefunction(fn):
                @functools.wraps(fn)
                async def async_wrapper(*args, **kwargs):
                    k = key_of(args, kwargs)
                    loop = asyncio.get_running_loop()

                    def produce() -> str:
                        # On a worker thread: the coroutine runs on the caller's loop.
                        future = asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), loop)
                        return store(future.result())

                    text = await loop.run_in_executor(
                        None, lambda: self._engine.get_or_insert(k, produce, ttl, tag_list))
                    return json.loads(text)

                return async_wrapper

            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                k = key_of(args, kwargs)
                text = self._engine.get_or_insert(k, lambda: store(fn(*args, **kwargs)), ttl, tag_list)
                return json.loads(text)

            return wrapper

        return decorate

    # -- administration ---------------------------------------------------------------------

    def invalidate(self, *, model=None, user=None, session=None, namespace=None, tag=None,
                   key=None, older_than: Optional[float] = None) -> int:
        """Invalidates by one selector, on every node; the entries affected (an estimate but
        for ``key``)."""
        given = {k: v for k, v in dict(model=model, user=user, session=session,
                                        namespace=namespace, tag=tag, key=key,
                                        older_than=older_than).items() if v is not None}
        if len(given) != 1:
            raise ValueError("give one selector: model, user, session, namespace, tag, key or older_than")
        (kind, value), = given.items()
        return self._engine.invalidate(kind, str(value))

    def clear(self, *, confirm: bool = False) -> int:
        """Invalidates everything everywhere and empties this node's tiers."""
        if confirm is not True:
            raise ValueError("clear(confirm=True): this drops every entry on every node")
        return self._engine.clear()

    def stats(self) -> dict:
        """This process's counters."""
        return json.loads(self._engine.stats())

    def report(self, since: Optional[str] = None, by: Optional[str] = None) -> dict:
        """The ``strata report`` of this node as a dict (``since="7d"``, ``by="model"``)."""
        return json.loads(self._engine.report(since, by))

    def flush(self) -> None:
        """Makes every write durable (uploads too, with S3)."""
        self._engine.flush()

    def close(self) -> None:
        """Closes the cache; later calls raise ``StrataError``."""
        self._engine.close()

    @property
    def closed(self) -> bool:
        return self._engine.closed

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
