"""strata as LiteLLM's cache backend, with LiteLLM's `mock_response` standing in for the model."""

import pytest

litellm = pytest.importorskip("litellm")

from litellm.caching.caching import Cache as LiteLLMCache

from strata.litellm import StrataLiteLLMCache

MESSAGES = [{"role": "user", "content": "What does strata cache?"}]


@pytest.fixture(autouse=True)
def no_global_cache():
    yield
    litellm.cache = None


def plug(backend):
    litellm.cache = LiteLLMCache(type="local")
    litellm.cache.cache = backend


def test_the_second_identical_call_is_a_hit(cache):
    plug(StrataLiteLLMCache(cache))
    first = litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="first")
    # A different mock answer: were the model called again, it would say so.
    second = litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="second")
    assert first.choices[0].message.content == "first"
    assert second.choices[0].message.content == "first"
    assert second._hidden_params.get("cache_hit") is True
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    assert cache.stats()["hits"]["l1"] >= 1


def test_async_calls_hit_too(cache):
    import asyncio

    plug(StrataLiteLLMCache(cache))

    async def main():
        a = await litellm.acompletion(model="gpt-4o-mini", messages=MESSAGES, mock_response="async")
        # LiteLLM stores an async answer from a task of its own, after handing it back.
        for _ in range(100):
            if cache.stats()["puts"] >= 1:
                break
            await asyncio.sleep(0.02)
        b = await litellm.acompletion(model="gpt-4o-mini", messages=MESSAGES, mock_response="other")
        return a.choices[0].message.content, b.choices[0].message.content

    assert asyncio.run(main()) == ("async", "async")


def test_costs_and_tokens_reach_the_report(cache):
    plug(StrataLiteLLMCache(cache))
    for _ in range(2):
        litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="priced")
    report = cache.report(since="1h")
    row = next(g for g in report["by_model"] if g["group"] == "litellm")
    assert row["tokens_saved"] > 0
    assert row["cost_saved_usd"] > 0


def test_a_user_scoped_cache_does_not_leak_across_users(cache):
    plug(StrataLiteLLMCache(cache, user="alice"))
    alice = litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="for alice")
    plug(StrataLiteLLMCache(cache, user="bob"))
    bob = litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="for bob")
    assert alice.choices[0].message.content == "for alice"
    assert bob.choices[0].message.content == "for bob"
