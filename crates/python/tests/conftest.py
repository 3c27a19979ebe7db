import os
import pathlib

import pytest

import strata


@pytest.fixture
def cache(tmp_path):
    with strata.Cache(disk_path=str(tmp_path / "cache")) as c:
        yield c


@pytest.fixture
def strata_bin():
    path = os.environ.get("STRATA_BIN") or str(
        pathlib.Path(__file__).resolve().parents[3] / "target" / "debug" / "strata")
    if not os.path.exists(path):
        pytest.fail(f"the strata command is needed at {path} (set STRATA_BIN)")
    return path


def chat(text, model="gpt-4o-mini"):
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def answer(text, prompt_tokens=10, completion_tokens=20):
    return {
        "choices": [{"message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }
