"""Drives the real Python `anthropic` SDK against the Charter gateway, as a user would.

Run by tests/api/gateway_sdk.rs with the venv of one SDK version (tests/sdk/setup.sh):
    GATEWAY_URL=http://127.0.0.1:PORT TEST_ID=py-... REFUSAL='...' python client.py
The gateway's upstream is the mock of tests/common/anthropic_mock.rs; the `model` picks
its answer and the `x-test-id` header (TEST_ID-scenario) groups what it received, so the
Rust test can check what upstream saw (e.g. how often the SDK retried).
Each scenario asserts what a user would; the script prints `ok <scenario>` per scenario
and exits non-zero on the first failure.
"""

import os
import sys

import anthropic

BASE = os.environ["GATEWAY_URL"]
TEST_ID = os.environ["TEST_ID"]
REFUSAL = os.environ["REFUSAL"]
PLAIN_TEXT = os.environ["PLAIN_TEXT"]
RICH_TEXT = os.environ["RICH_TEXT"]
REVISION_TEXT = os.environ["REVISION_TEXT"]
PIPE_BOMB_PROMPT = os.environ["PIPE_BOMB_PROMPT"]
FLAG_KEY = os.environ["FLAG_KEY"]
ASK = [{"role": "user", "content": "What is the capital of France?"}]


def client(scenario, api_key="sk-sdk-client", **kwargs):
    return anthropic.Anthropic(
        base_url=BASE,
        api_key=api_key,
        default_headers={"x-test-id": f"{TEST_ID}-{scenario}"},
        **kwargs,
    )


def charter(message):
    """The gateway's extra `charter` field, as the SDK keeps it."""
    extra = message.to_dict()
    return extra.get("charter")


def expect(condition, what):
    if not condition:
        raise AssertionError(what)


def create():
    m = client("create").messages.create(
        model="mock-plain",
        max_tokens=64,
        messages=ASK,
        extra_body={"charter_test_unknown": {"kept": True}},
    )
    expect(m.content[0].type == "text", m)
    expect(m.content[0].text == PLAIN_TEXT, m)
    expect(m.stop_reason == "end_turn", m)
    expect(m.usage.input_tokens == 12, m.usage)
    meta = charter(m)
    expect(meta["verdict"] == "pass" and meta["action"] == "none", meta)


def stream():
    with client("stream").messages.stream(
        model="mock-rich",
        max_tokens=256,
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}],
    ) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    expect(streamed == RICH_TEXT, streamed)
    expect([b.type for b in final.content] == ["thinking", "text", "tool_use"], final.content)
    expect(final.content[1].text == RICH_TEXT, final)
    expect(final.content[2].input == {"city": "Paris", "unit": "celsius"}, final.content[2])
    expect(final.stop_reason == "tool_use", final.stop_reason)


def count_tokens():
    r = client("count").messages.count_tokens(model="mock-plain", messages=ASK)
    expect(r.input_tokens == 17, r)


def models():
    c = client("models")
    ids = [m.id for m in c.models.list(limit=1)]
    expect(ids == ["claude-mock-1", "claude-mock-2"], ids)
    expect(c.models.retrieve("claude-mock-2").id == "claude-mock-2", "retrieve")


def blocked_prompt():
    m = client("blocked-prompt").messages.create(
        model="mock-plain",
        max_tokens=64,
        messages=[{"role": "user", "content": PIPE_BOMB_PROMPT}],
    )
    expect(m.stop_reason == "refusal", m)
    expect(m.content[0].text == REFUSAL, m)
    expect(charter(m)["failed"] == "prompt", charter(m))


def blocked_output():
    m = client("blocked-output").messages.create(
        model="mock-harmful", max_tokens=64, messages=ASK
    )
    expect(m.stop_reason == "refusal", m)
    expect(m.content[0].text == REFUSAL, m)
    expect("gunpowder" not in str(m.to_dict()), m)
    with client("blocked-output-stream").messages.stream(
        model="mock-harmful", max_tokens=64, messages=ASK
    ) as s:
        final = s.get_final_message()
    expect(final.stop_reason == "refusal", final)
    expect(final.content[-1].text == REFUSAL, final)
    expect("gunpowder" not in "".join(b.text for b in final.content), final)


def revised_output():
    m = client("revised").messages.create(
        model="mock-privacy",
        max_tokens=256,
        messages=[{"role": "user", "content": "Where does she live?"}],
    )
    expect(m.content[0].text == REVISION_TEXT, m)
    meta = charter(m)
    expect(meta["action"] == "revise" and meta["revise_rounds"] == 1, meta)
    expect(meta["extra_usage"]["input_tokens"] > 0, meta)


def midstream_block():
    with client("midstream-block").messages.stream(
        model="mock-long-harmful", max_tokens=512, messages=ASK
    ) as s:
        final = s.get_final_message()
    expect(final.stop_reason == "refusal", final)
    expect(len(final.content) == 2, final.content)
    released = final.content[0].text
    expect(len(released) > 0 and "pipe" not in released, released)
    expect(final.content[1].text == REFUSAL, final.content[1])


def rate_limited():
    try:
        client("429", max_retries=2).messages.create(model="mock-429", max_tokens=8, messages=ASK)
    except anthropic.RateLimitError as e:
        expect(e.status_code == 429, e)
        expect(e.response.headers.get("retry-after") == "1", e.response.headers)
        expect(e.response.headers.get("request-id", "").startswith("req_mock_"), e.response.headers)
        expect(e.body["error"]["type"] == "rate_limit_error", e.body)
    else:
        raise AssertionError("no RateLimitError")


def overloaded():
    try:
        client("529", max_retries=2).messages.create(model="mock-529", max_tokens=8, messages=ASK)
    except anthropic.APIStatusError as e:
        expect(e.status_code == 529, e)
        expect(type(e).__name__ in ("OverloadedError", "InternalServerError"), type(e))
        expect(e.body["error"]["type"] == "overloaded_error", e.body)
    else:
        raise AssertionError("no error for 529")


def midstream_error():
    try:
        with client("midstream-error").messages.stream(
            model="mock-midstream-error", max_tokens=64, messages=ASK
        ) as s:
            s.get_final_message()
    except anthropic.APIStatusError as e:
        expect("overloaded_error" in str(e), e)
    else:
        raise AssertionError("no error for a mid-stream error event")


def next_turn():
    """After each outcome, the answer appended to the history is accepted next turn (the
    mock rejects what the real API rejects, e.g. an empty text block)."""
    cases = [
        ("pass", "sk-sdk-client", "mock-plain", "none", "none"),
        ("flag", FLAG_KEY, "mock-harmful", "flag", "flag"),
        ("block", "sk-sdk-client", "mock-harmful", "block", "block"),
        ("block-late", "sk-sdk-client", "mock-long-harmful", "block", "block"),
        ("revise", "sk-sdk-client", "mock-privacy", "revise", "block"),
    ]
    for name, key, model, created, streamed in cases:
        c = client(f"turns-{name}", api_key=key)
        first = c.messages.create(model=model, max_tokens=256, messages=ASK)
        with c.messages.stream(model=model, max_tokens=256, messages=ASK) as s:
            final = s.get_final_message()
        expect(charter(first)["action"] == created, (name, charter(first)))
        # A stream's metadata rides on message_delta, which the SDK does not keep.
        expect((final.stop_reason == "refusal") == (streamed == "block"), (name, final))
        for message in [first, final]:
            expect(all(b.text.strip() for b in message.content if b.type == "text"), message)
            expect(message.usage.output_tokens > 1, (name, message.usage))
            history = ASK + [
                {"role": "assistant", "content": message.content},
                {"role": "user", "content": "Thanks. What else is worth seeing there?"},
            ]
            reply = c.messages.create(model="mock-plain", max_tokens=64, messages=history)
            expect(reply.content[0].text == PLAIN_TEXT, reply)


SCENARIOS = [
    create,
    stream,
    count_tokens,
    models,
    blocked_prompt,
    blocked_output,
    revised_output,
    midstream_block,
    rate_limited,
    overloaded,
    midstream_error,
    next_turn,
]

if __name__ == "__main__":
    print(f"anthropic {anthropic.__version__}", flush=True)
    for scenario in SCENARIOS:
        try:
            scenario()
        except Exception as e:  # noqa: BLE001 - report which scenario failed, then fail
            print(f"FAILED {scenario.__name__}: {type(e).__name__}: {e}", flush=True)
            sys.exit(1)
        print(f"ok {scenario.__name__}", flush=True)
