"""Two nodes sharing the test suite's S3 server (`examples/test_s3_server.rs`, s3s-fs on a
loopback port): what one stores, another reads from S3; an invalidation reaches new nodes."""

import json
import os
import pathlib
import subprocess

import pytest

import strata
from conftest import answer, chat

ROOT = pathlib.Path(__file__).resolve().parents[3]


@pytest.fixture
def s3():
    server = os.environ.get("STRATA_S3_SERVER") or str(ROOT / "target" / "debug" / "examples" / "test_s3_server")
    if not os.path.exists(server):
        pytest.fail(f"the test S3 server is needed at {server} (`cargo build --example test_s3_server`)")
    process = subprocess.Popen([server], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        settings = json.loads(process.stdout.readline())
        yield settings
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def node(s3, disk):
    return strata.Cache(disk_path=str(disk), s3_enabled=True, s3_bucket=s3["bucket"],
                        s3_endpoint=s3["endpoint"], s3_prefix=s3["prefix"],
                        s3_region=s3["region"], s3_access_key=s3["access_key"],
                        s3_secret_key=s3["secret_key"])


def test_what_one_node_stores_another_reads_from_s3(s3, tmp_path):
    with node(s3, tmp_path / "a") as a:
        a.put(chat("shared question"), answer("from node a"), provider="openai", tags=["shared"])
        a.flush()
    with node(s3, tmp_path / "b") as b:
        hit = b.lookup(chat("shared question"))
        assert hit is not None and hit.outcome == "L3"
        assert hit["choices"][0]["message"]["content"] == "from node a"
        assert b.lookup(chat("shared question")).outcome == "L1"
        b.invalidate(tag="shared")
    with node(s3, tmp_path / "c") as c:
        assert c.get(chat("shared question")) is None, "node b's invalidation reached the bucket"
