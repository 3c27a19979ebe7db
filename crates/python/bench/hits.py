"""Hits from Python: strata's `Cache.get` (memory tier, then disk tier) against LiteLLM's
in-memory cache, over the same 2,000 ShareGPT requests, in one run.

    scripts/bench-python            # builds the package (release) into target/py-venv-strata

The memory-tier figure is with the key memo (the default: a request text seen before is not
parsed again); the same hits with it off are printed beside it. Each figure is the median of
per-call times (time.perf_counter_ns around one call), every request looked up once per pass,
three passes.
"""

import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import zstandard

import strata

N = 2000
DATA = pathlib.Path(os.environ.get("STRATA_DATA", pathlib.Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "sharegpt-chat-dev.jsonl.zst"))


def exchanges():
    text = zstandard.ZstdDecompressor().stream_reader(open(DATA, "rb")).read().decode("utf-8")
    out = []
    for line in text.split("\n"):
        if line.strip():
            e = json.loads(line)
            out.append((e["request"], e["response"], e.get("provider", "openai")))
        if len(out) == N:
            break
    return out


def p50_us(times_ns):
    return statistics.median(times_ns) / 1000


def timed(calls, passes=3):
    times = []
    for _ in range(passes):
        for call in calls:
            t = time.perf_counter_ns()
            found = call()
            times.append(time.perf_counter_ns() - t)
            assert found is not None
    return times


def main():
    data = exchanges()
    print(f"{len(data)} requests from {DATA.name}; Python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        disk = os.path.join(tmp, "cache")
        with strata.Cache(disk_path=disk, memory_capacity="1 GiB", analytics_enabled=False) as cache:
            for request, response, provider in data:
                cache.put(request, response, provider=provider)
            memory = timed([lambda r=r: cache.get(r) for r, _, _ in data])
        # The same hits with the key memo off: every lookup parses and normalizes its request,
        # as a request text seen for the first time is.
        with strata.Cache(disk_path=disk, memory_capacity="1 GiB", memory_key_memo=0,
                          analytics_enabled=False) as cache:
            for request, response, provider in data:
                cache.put(request, response, provider=provider)
            unmemoized = timed([lambda r=r: cache.get(r) for r, _, _ in data])
        # A new process's view: a fresh memory tier, so every first lookup is a disk-tier hit.
        disk_times = []
        for _ in range(3):
            with strata.Cache(disk_path=disk, memory_capacity="1 GiB", analytics_enabled=False) as cache:
                for request, _, _ in data:
                    t = time.perf_counter_ns()
                    hit = cache.lookup(request)
                    disk_times.append(time.perf_counter_ns() - t)
                    assert hit is not None and hit.outcome == "L2", hit and hit.outcome

    import litellm
    from litellm.caching.caching import Cache as LiteLLMCache

    lite = LiteLLMCache(type="local", max_messages=None)
    lite.cache.max_size_in_memory = 10 * N
    for request, response, _ in data:
        key = lite.get_cache_key(**request)
        lite.cache.set_cache(key, {"timestamp": time.time(), "response": json.dumps(response)})
    litellm_times = timed([lambda r=r: lite.get_cache(**r) for r, _, _ in data])

    m, d, l = p50_us(memory), p50_us(disk_times), p50_us(litellm_times)
    u = p50_us(unmemoized)
    print(f"strata memory-tier hit  p50 {m:8.2f} µs")
    print(f"  the same, key memo off p50 {u:7.2f} µs  ({l / u:.2f}x faster than LiteLLM)")
    print(f"strata disk-tier hit    p50 {d:8.2f} µs")
    print(f"LiteLLM in-memory hit   p50 {l:8.2f} µs  (litellm {litellm.__version__ if hasattr(litellm, '__version__') else ''})")
    print(f"memory tier: {l / m:.2f}x faster than LiteLLM (target at least 3x): {'met' if l / m >= 3 else 'NOT met'}")
    print(f"disk tier:   {l / d:.2f}x LiteLLM's speed (target faster than LiteLLM): {'met' if d < l else 'NOT met'}")


if __name__ == "__main__":
    main()
