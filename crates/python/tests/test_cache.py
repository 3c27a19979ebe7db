"""The package's own API: keys, scopes, concurrency, persistence, invalidation, the decorator."""

import asyncio
import json
import subprocess
import sys
import threading
import time

import pytest

import strata
from conftest import answer, chat


def test_keys_agree_with_strata_explain(cache, strata_bin, tmp_path):
    # Keys come from the key memo once a text was keyed; with it off, each is derived anew.
    unmemoized = strata.Cache(disk_path=str(tmp_path / "no-memo"), memory_key_memo=0)
    for request, scope in [
        (chat("What is the capital of France?"), {}),
        ({"model": "claude-sonnet-4-5", "max_tokens": 100, "temperature": 0,
          "messages": [{"role": "user", "content": [{"type": "text", "text": " hi "}]}]}, {}),
        (chat("mine"), {"user": "alice"}),
    ]:
        path = tmp_path / "request.json"
        path.write_text(json.dumps(request))
        args = [strata_bin, "explain", "--request", str(path), "--json"]
        if "user" in scope:
            args += ["--user", scope["user"]]
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
        want = json.loads(out)["key"]
        assert cache.key(request, **scope) == want
        assert cache.key(request, **scope) == want, "from the memo"
        assert unmemoized.key(request, **scope) == want
    unmemoized.close()


def test_a_miss_then_a_hit_and_scopes_isolate(cache):
    request = chat("hello")
    assert cache.get(request) is None
    calls = []
    first = cache.get_or_call(request, lambda: calls.append(1) or answer("hi there"))
    assert first.outcome == "Miss" and first["choices"][0]["message"]["content"] == "hi there"
    second = cache.get_or_call(request, lambda: calls.append(1) or answer("other"))
    assert second.outcome == "L1" and second == first and calls == [1]
    assert cache.get(request, user="alice") is None
    cache.put(request, answer("for alice"), user="alice")
    assert cache.get(request, user="alice")["choices"][0]["message"]["content"] == "for alice"
    assert cache.get(request, user="bob") is None
    assert cache.get(request, session="s1") is None
    assert cache.get(json.dumps(request)) == first, "JSON text is taken as it is"


def test_errors_are_python_exceptions(cache):
    with pytest.raises(ValueError, match="not valid JSON"):
        cache.get("{not json")
    with pytest.raises(KeyError):
        cache.get_or_call(chat("boom"), lambda: {}["missing"])
    assert cache.get(chat("boom")) is None, "a failed call stores nothing"
    with pytest.raises(TypeError, match="JSON"):
        cache.put(chat("x"), {"a": object()})
    with pytest.raises(ValueError, match="one selector"):
        cache.invalidate(model="a", tag="b")
    with pytest.raises(ValueError, match="confirm"):
        cache.clear()


def test_64_threads_with_one_identical_miss_make_one_call(cache):
    calls = []
    lock = threading.Lock()

    def model():
        with lock:
            calls.append(1)
        time.sleep(0.2)
        return answer("shared")

    barrier = threading.Barrier(64)
    results = []

    def worker():
        barrier.wait()
        results.append(cache.get_or_call(chat("the same question"), model))

    threads = [threading.Thread(target=worker) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 64 and all(r == results[0] for r in results)


def test_64_asyncio_tasks_with_one_identical_miss_make_one_call(cache):
    calls = []

    async def model():
        calls.append(1)
        await asyncio.sleep(0.2)
        return answer("shared")

    async def main():
        return await asyncio.gather(*[cache.aget_or_call(chat("async question"), model)
                                      for _ in range(64)])

    results = asyncio.run(main())
    assert len(calls) == 1
    assert all(r == results[0] for r in results)
    assert cache.get(chat("async question")) == results[0]


def test_a_second_process_reads_what_the_first_stored(tmp_path):
    disk = str(tmp_path / "shared")
    with strata.Cache(disk_path=disk) as first:
        first.put(chat("persisted"), answer("from the first process"), provider="openai")
    script = (
        "import strata, json, sys\n"
        f"c = strata.Cache(disk_path={disk!r})\n"
        "h = c.lookup({'model': 'gpt-4o-mini', 'messages': [{'role': 'user', 'content': 'persisted'}]})\n"
        "print(json.dumps([h.outcome, h['choices'][0]['message']['content']]))\n"
        "c.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    assert json.loads(out.stdout) == ["L2", "from the first process"]


def test_invalidation_by_model_user_and_tag(cache):
    cache.put(chat("a"), answer("a"), tags=["team:search"])
    cache.put(chat("b", model="gpt-4o"), answer("b"))
    cache.put(chat("c"), answer("c"), user="alice")
    cache.invalidate(tag="team")
    assert cache.get(chat("a")) is None, "`team` covers `team:search`"
    assert cache.get(chat("b", model="gpt-4o")) is not None
    cache.invalidate(model="gpt-4o")
    assert cache.get(chat("b", model="gpt-4o")) is None
    assert cache.get(chat("c"), user="alice") is not None
    cache.invalidate(user="alice")
    assert cache.get(chat("c"), user="alice") is None
    cache.put(chat("d"), answer("d"))
    cache.clear(confirm=True)
    assert cache.get(chat("d")) is None


def test_stats_and_report_count_costs_and_tokens(cache):
    cache.get_or_call(chat("priced"), lambda: answer("x", 1000, 2000), provider="openai")
    cache.get_or_call(chat("priced"), lambda: answer("y"))
    stats = cache.stats()
    assert stats["hits"]["l1"] == 1 and stats["misses"] == 1
    report = cache.report(since="1h")
    assert report["requests"] == 2
    row = next(g for g in report["by_model"] if g["group"] == "gpt-4o-mini")
    assert row["tokens_saved"] == 3000
    assert row["cost_saved_usd"] > 0


def test_the_decorator_caches_sync_and_async_functions(cache):
    calls = []

    @cache.cached(ttl=60, tags=["lookups"])
    def lookup(city, units="metric"):
        calls.append(city)
        return {"city": city, "units": units, "temp": 21.5}

    assert lookup("Paris") == {"city": "Paris", "units": "metric", "temp": 21.5}
    assert lookup("Paris") == lookup("Paris") and calls == ["Paris"]
    assert lookup("Paris", units="imperial")["units"] == "imperial" and len(calls) == 2
    cache.invalidate(tag="lookups")
    lookup("Paris")
    assert len(calls) == 3

    acalls = []

    @cache.cached(key=lambda n: f"n={n}")
    async def square(n):
        acalls.append(n)
        await asyncio.sleep(0.05)
        return n * n

    async def main():
        return await asyncio.gather(*[square(7) for _ in range(16)])

    assert asyncio.run(main()) == [49] * 16
    assert acalls == [7]

    @cache.cached()
    def unstorable():
        return {1, 2}

    with pytest.raises(TypeError, match="JSON"):
        unstorable()


def test_a_closed_cache_says_so(tmp_path):
    c = strata.Cache(disk_path=str(tmp_path / "c"))
    c.close()
    assert c.closed
    with pytest.raises(strata.StrataError, match="closed"):
        c.get(chat("late"))


def test_unknown_settings_are_refused(tmp_path):
    with pytest.raises(strata.StrataError, match="disk_pth|not a setting|unknown"):
        strata.Cache(disk_pth=str(tmp_path))
