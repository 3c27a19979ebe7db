"""A LangChain cache on strata: ``set_llm_cache(StrataCache(cache))``.

Entries are keyed on the prompt (for chat models, LangChain's serialized messages) and the
model's ``llm_string`` (its parameters), stored in every tier strata has, tagged ``langchain``,
and reported under the model's name with the tokens of its ``usage_metadata``.
"""

from __future__ import annotations

import json
import re
import warnings
from typing import Any, Optional, Sequence

from langchain_core.caches import BaseCache
from langchain_core.load import dumps, loads
from langchain_core.messages import AIMessage
from langchain_core.outputs import ChatGeneration, Generation

from . import Cache

__all__ = ["StrataCache"]

_MODEL = re.compile(r"""['"](?:model_name|model)['"]\s*[:,]\s*['"]([^'"]+)['"]""")
TAG = "langchain"


def model_of(llm_string: str) -> str:
    """The model's name in an ``llm_string``, else its ``_type``, else ``langchain``."""
    found = _MODEL.search(llm_string)
    if found:
        return found.group(1)
    kind = re.search(r"""['"]_type['"]\s*[:,]\s*['"]([^'"]+)['"]""", llm_string)
    return kind.group(1) if kind else "langchain"


class StrataCache(BaseCache):
    """LangChain's ``BaseCache`` over a :class:`strata.Cache`. ``user``, ``session`` or
    ``namespace`` scope every entry it reads and writes."""

    def __init__(self, cache: Cache, *, user: Optional[str] = None, session: Optional[str] = None,
                 namespace: Optional[str] = None, ttl: Optional[float] = None) -> None:
        self.cache = cache
        self.scope = {"user": user, "session": session, "namespace": namespace}
        self.ttl = ttl

    @staticmethod
    def _request(prompt: str, llm_string: str) -> dict:
        return {
            "model": model_of(llm_string),
            "messages": [{"role": "user", "content": prompt}],
            "langchain_llm": llm_string,
        }

    def lookup(self, prompt: str, llm_string: str) -> Optional[Sequence[Generation]]:
        found = self.cache.get(self._request(prompt, llm_string), **self.scope)
        if found is None:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            generations = loads(found["generations"],
                                allowed_objects=[ChatGeneration, AIMessage, Generation])
        return list(generations)

    def update(self, prompt: str, llm_string: str, return_val: Sequence[Generation]) -> None:
        input_tokens = output_tokens = 0
        for generation in return_val:
            usage = getattr(getattr(generation, "message", None), "usage_metadata", None) or {}
            input_tokens += usage.get("input_tokens", 0)
            output_tokens += usage.get("output_tokens", 0)
        response = {
            "generations": dumps(list(return_val)),
            "usage": {"prompt_tokens": input_tokens, "completion_tokens": output_tokens},
        }
        self.cache.put(self._request(prompt, llm_string), response, provider="langchain",
                       tags=[TAG], ttl=self.ttl, **self.scope)

    def clear(self, **kwargs: Any) -> None:
        """Invalidates every LangChain entry (on every node)."""
        self.cache.invalidate(tag=TAG)
