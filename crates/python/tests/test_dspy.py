"""strata as DSPy's cache, with a DSPy LM answering through LiteLLM's `mock_response`
(DSPy's DummyLM bypasses the cache altogether)."""

import pytest

dspy = pytest.importorskip("dspy")

from strata.dspy import StrataDSPyCache


@pytest.fixture(autouse=True)
def restore_cache():
    saved = dspy.cache
    yield
    dspy.cache = saved


def lm(answer):
    return dspy.LM("openai/gpt-4o-mini", api_key="sk-test",
                   mock_response=f"[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]")


def ask(model, question="What does strata cache?"):
    with dspy.context(lm=model):
        return dspy.Predict("question -> answer")(question=question).answer


def test_the_second_identical_call_is_a_hit(cache):
    dspy.cache = StrataDSPyCache(cache)
    assert ask(lm("LLM answers")) == "LLM answers"
    hits = cache.stats()["hits"]["l1"]
    assert ask(lm("LLM answers")) == "LLM answers"
    assert cache.stats()["hits"]["l1"] == hits + 1


def test_costs_and_tokens_reach_the_report(cache):
    dspy.cache = StrataDSPyCache(cache)
    ask(lm("priced"), "a priced question")
    ask(lm("priced"), "a priced question")
    report = cache.report(since="1h")
    row = next(g for g in report["by_model"] if "gpt-4o-mini" in g["group"])
    assert row["tokens_saved"] > 0
    assert row["cost_saved_usd"] > 0


def test_a_user_scoped_cache_does_not_leak_across_users(cache):
    dspy.cache = StrataDSPyCache(cache, user="alice")
    model = lm("the same")
    ask(model, "private")
    misses = cache.stats()["misses"]
    dspy.cache = StrataDSPyCache(cache, user="bob")
    ask(model, "private")
    assert cache.stats()["misses"] == misses + 1, "bob's lookup must not find alice's entry"
