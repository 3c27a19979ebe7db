"""A LiteLLM cache backend on strata::

    import litellm
    from litellm.caching.caching import Cache
    from strata.litellm import StrataLiteLLMCache
    litellm.cache = Cache(type="local")
    litellm.cache.cache = StrataLiteLLMCache(cache)

LiteLLM computes the key; strata stores the answer in its tiers (scoped by ``user``,
``session`` or ``namespace``), with its tokens, cost and provider, tagged ``litellm``.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

from litellm.caching.base_cache import BaseCache

from . import Cache

__all__ = ["StrataLiteLLMCache"]

TAG = "litellm"


class StrataLiteLLMCache(BaseCache):
    """LiteLLM's ``BaseCache`` over a :class:`strata.Cache`."""

    def __init__(self, cache: Cache, *, user: Optional[str] = None,
                 session: Optional[str] = None, namespace: Optional[str] = None,
                 default_ttl: int = 3600) -> None:
        super().__init__(default_ttl=default_ttl)
        self.cache = cache
        self.scope = {"user": user, "session": session, "namespace": namespace}

    @staticmethod
    def _request(key: str) -> dict:
        # The key is LiteLLM's (a digest of the model and every parameter of the call).
        return {"model": "litellm", "messages": [{"role": "user", "content": str(key)}]}

    def set_cache(self, key, value, **kwargs):
        if not isinstance(value, dict) or not isinstance(value.get("response"), str):
            return  # not a completion LiteLLM stores: nothing to keep
        try:
            response = json.loads(value["response"])
        except ValueError:
            return
        usage = response.get("usage") or {}
        model = kwargs.get("model") or response.get("model") or ""
        cost = None
        try:
            import litellm

            prompt, completion = litellm.cost_per_token(
                model=model, prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=usage.get("completion_tokens", 0))
            cost = prompt + completion
        except Exception:
            pass  # an unpriced model: strata prices it from its own table, or not at all
        provider = kwargs.get("custom_llm_provider") or (model.split("/", 1)[0] if "/" in model else "litellm")
        stored = {"timestamp": value.get("timestamp", time.time()), "response": response,
                  "usage": usage, "model": model}
        ttl = kwargs.get("ttl") or self.default_ttl
        self.cache.put(self._request(key), stored, provider=provider, cost_usd=cost,
                       tags=[TAG], ttl=float(ttl) if ttl else None, **self.scope)

    def get_cache(self, key, **kwargs):
        found = self.cache.get(self._request(key), **self.scope)
        if found is None:
            return None
        return {"timestamp": found.get("timestamp"), "response": json.dumps(found["response"])}

    async def async_set_cache(self, key, value, **kwargs):
        self.set_cache(key, value, **kwargs)

    async def async_get_cache(self, key, **kwargs):
        return self.get_cache(key, **kwargs)

    async def async_set_cache_pipeline(self, cache_list, **kwargs):
        for key, value in cache_list:
            self.set_cache(key, value, **kwargs)

    def flush_cache(self):
        self.cache.invalidate(tag=TAG)
