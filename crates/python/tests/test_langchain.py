"""strata as LangChain's cache, with LangChain's own fake chat model (from PyPI)."""

import asyncio

import pytest

pytest.importorskip("langchain_core")

from langchain_core.globals import set_llm_cache
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage

from strata.langchain import StrataCache, model_of


class PricedFake(GenericFakeChatModel):
    """LangChain's fake chat model, named as a priced model, counting its calls."""

    model_name: str = "gpt-4o-mini"
    calls: int = 0

    @property
    def _identifying_params(self):
        return {"model_name": self.model_name}

    def _generate(self, *args, **kwargs):
        self.calls += 1
        return super()._generate(*args, **kwargs)


def fake(texts):
    messages = [AIMessage(content=t, usage_metadata={"input_tokens": 100, "output_tokens": 200,
                                                     "total_tokens": 300}) for t in texts]
    return PricedFake(messages=iter(messages))


@pytest.fixture(autouse=True)
def no_global_cache():
    yield
    set_llm_cache(None)


def test_the_second_identical_call_makes_no_model_call(cache):
    set_llm_cache(StrataCache(cache))
    model = fake(["first answer", "second answer"])
    assert model.invoke("What is strata?").content == "first answer"
    again = model.invoke("What is strata?")
    assert again.content == "first answer"
    assert again.usage_metadata["input_tokens"] == 100
    assert model.calls == 1
    assert model.invoke("Something else").content == "second answer"
    assert model.calls == 2


def test_costs_and_tokens_reach_the_report(cache):
    set_llm_cache(StrataCache(cache))
    model = fake(["answer"])
    model.invoke("priced question")
    model.invoke("priced question")
    report = cache.report(since="1h")
    row = next(g for g in report["by_model"] if g["group"] == "gpt-4o-mini")
    assert row["requests"] >= 1
    assert row["tokens_saved"] == 300
    assert row["cost_saved_usd"] > 0


def test_a_user_scoped_cache_does_not_leak_across_users(cache):
    alice = fake(["for alice", "unused"])
    set_llm_cache(StrataCache(cache, user="alice"))
    assert alice.invoke("private question").content == "for alice"
    bob = fake(["for bob"])
    set_llm_cache(StrataCache(cache, user="bob"))
    assert bob.invoke("private question").content == "for bob"
    assert bob.calls == 1


def test_async_calls_use_the_cache_too(cache):
    set_llm_cache(StrataCache(cache))
    model = fake(["async answer", "unused"])

    async def main():
        first = await model.ainvoke("async question")
        second = await model.ainvoke("async question")
        return first.content, second.content

    assert asyncio.run(main()) == ("async answer", "async answer")
    assert model.calls == 1


def test_clear_drops_langchain_entries(cache):
    lc = StrataCache(cache)
    set_llm_cache(lc)
    model = fake(["one", "two"])
    model.invoke("q")
    lc.clear()
    assert model.invoke("q").content == "two"


def test_the_model_name_is_read_from_llm_strings():
    assert model_of('{"kwargs": {"model_name": "gpt-4o-mini"}}---[]') == "gpt-4o-mini"
    assert model_of("[('_type', 'fake-list-chat-model'), ('stop', None)]") == "fake-list-chat-model"
    assert model_of("[]") == "langchain"
