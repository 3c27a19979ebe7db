"""A DSPy cache on strata: ``dspy.cache = StrataDSPyCache(cache)``.

DSPy computes the key of each LM request; strata stores the LM's answer (a LiteLLM
``ModelResponse``, or a JSON document) in its tiers, scoped by ``user``, ``session`` or
``namespace``, under the request's model, with its tokens and cost, tagged ``dspy``. Values of
other kinds are not stored (DSPy then simply calls the LM).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from dspy.clients.cache import Cache as _DSPyCache

from . import Cache

__all__ = ["StrataDSPyCache"]

TAG = "dspy"


class StrataDSPyCache(_DSPyCache):
    """DSPy's ``Cache`` over a :class:`strata.Cache` (DSPy's own memory and disk caches off)."""

    def __init__(self, cache: Cache, *, user: Optional[str] = None,
                 session: Optional[str] = None, namespace: Optional[str] = None) -> None:
        super().__init__(enable_disk_cache=False, enable_memory_cache=False, disk_cache_dir=None)
        self.strata = cache
        self.scope = {"user": user, "session": session, "namespace": namespace}

    def _request(self, request: dict, ignored) -> Optional[dict]:
        try:
            key = self.cache_key(request, ignored)
        except Exception:
            return None
        model = request.get("model") if isinstance(request.get("model"), str) else "dspy"
        return {"model": model, "messages": [{"role": "user", "content": key}]}

    def get(self, request: dict, ignored_args_for_cache_key=None) -> Any:
        keyed = self._request(request, ignored_args_for_cache_key)
        if keyed is None:
            return None
        found = self.strata.get(keyed, **self.scope)
        if found is None:
            return None
        if found.get("kind") == "litellm":
            from litellm import ModelResponse

            value = ModelResponse(**found["value"])
        else:
            value = copy.deepcopy(found["value"])
        prepare = getattr(self, "_prepare_cached_response", None)
        if prepare is not None:
            return prepare(value)
        if hasattr(value, "usage"):
            value.usage = {}
        if hasattr(value, "cache_hit"):
            value.cache_hit = True
        return value

    def put(self, request: dict, value: Any, ignored_args_for_cache_key=None,
            enable_memory_cache: bool = True) -> None:
        keyed = self._request(request, ignored_args_for_cache_key)
        if keyed is None:
            return
        if hasattr(value, "model_dump"):
            document = {"kind": "litellm", "value": value.model_dump(mode="json")}
            usage = document["value"].get("usage") or {}
            cost = (getattr(value, "_hidden_params", None) or {}).get("response_cost")
        elif isinstance(value, dict):
            document = {"kind": "json", "value": value}
            usage = value.get("usage") or {}
            cost = value.get("cost")
        else:
            return
        if isinstance(usage, dict):
            document["usage"] = {k: usage.get(k, 0) for k in ("prompt_tokens", "completion_tokens")}
        try:
            self.strata.put(keyed, document, provider="dspy", tags=[TAG],
                            cost_usd=float(cost) if cost is not None else None, **self.scope)
        except TypeError:
            pass  # not JSON: not stored, DSPy calls the LM again next time

    def reset_memory_cache(self) -> None:
        """Invalidates every DSPy entry (on every node)."""
        self.strata.invalidate(tag=TAG)
