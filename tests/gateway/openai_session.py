"""A scripted session of the official OpenAI Python SDK through `strata serve`.

Each call is made twice: a miss, then a hit. Prints one JSON object with what the SDK saw.
OPENAI_BASE_URL points at the gateway; the fake provider behind it answers.
"""

import json
import sys

import openai

client = openai.OpenAI(api_key="sk-strata-test", max_retries=0)
MODEL = "gpt-4o-mini"
out = {"version": openai.__version__}


def json_call(question):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": question}]
    )
    completion = raw.parse()
    return {
        "cache": raw.headers.get("x-strata-cache"),
        "key": raw.headers.get("x-strata-key"),
        "content": completion.choices[0].message.content,
        "usage": completion.usage.total_tokens if completion.usage else None,
    }


def stream_call(question):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage.total_tokens
    return {"content": "".join(pieces), "usage": usage}


def tool_call(question):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                    },
                },
            }
        ],
    )
    call = raw.parse().choices[0].message.tool_calls[0]
    return {
        "cache": raw.headers.get("x-strata-cache"),
        "name": call.function.name,
        "arguments": json.loads(call.function.arguments),
    }


out["json"] = [json_call("What is the capital of France?") for _ in range(2)]
out["stream"] = [stream_call("Tell me a short story.") for _ in range(2)]
out["tool"] = [tool_call("What is the weather in Paris?") for _ in range(2)]
json.dump(out, sys.stdout)
