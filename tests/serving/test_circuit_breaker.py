"""The probe path: every answer carries the circuit_breaker object; a trip answers the refusal.

The server runs the monitor's hook inside its own batched loop; these tests pin that its greedy answers
agree with `circuit_breakers.probes.monitor.monitored_generate_batch` (text, trip, index, max score).
"""
import pytest

from circuit_breakers.probes.monitor import monitored_generate_batch

from ..helpers import HUMAN, MODEL, chat, parse_sse, probe_for, streamed_text, threshold_tripping_at

REFUSAL = "I won't help with that."
N = 10


@pytest.fixture
def probe(model):
    return probe_for(model)


def client_for(make_app, probe, **kwargs):
    from fastapi.testclient import TestClient

    return TestClient(make_app(probe=probe, refusal=REFUSAL, **kwargs))


def reference(model, tokenizer, probe, messages=HUMAN):
    return monitored_generate_batch(model, tokenizer, [messages], probe, max_new_tokens=N, refusal=REFUSAL)[0]


def trip_setup(model, tokenizer, probe):
    """Set the probe's threshold so that the reference generation trips at a token after the first."""
    free = reference(model, tokenizer, probe)
    for index in range(2, len(free.scores)):
        threshold = threshold_tripping_at(free.scores, index)
        if threshold is not None:
            probe.threshold_logit = threshold
            ref = reference(model, tokenizer, probe)
            assert ref.tripped and ref.token_index == index
            return ref
    pytest.skip("no token of this random generation scores above all the tokens before it")


def test_untripped_answer_carries_the_object(make_app, model, tokenizer, probe):
    ref = reference(model, tokenizer, probe)
    with client_for(make_app, probe) as client:
        assert client.get("/v1/models").json()["data"][0]["circuit_breaker"] == {"layer": 2, "threshold": 1.0}
        body = chat(client, max_tokens=N).json()
    assert body["choices"][0]["message"]["content"] == ref.text
    assert body["choices"][0]["finish_reason"] == "length"
    breaker = body["circuit_breaker"]
    assert breaker == {"tripped": False, "max_score": pytest.approx(ref.max_score, abs=1e-5), "token_index": None,
                       "threshold": 1.0}


def test_tripped_answer_is_the_refusal(make_app, model, tokenizer, probe):
    ref = trip_setup(model, tokenizer, probe)
    with client_for(make_app, probe) as client:
        body = chat(client, max_tokens=N).json()
        choice, breaker = body["choices"][0], body["circuit_breaker"]
        assert choice["message"]["content"] == REFUSAL
        assert choice["finish_reason"] == "content_filter"
        assert breaker["tripped"] is True and breaker["token_index"] == ref.token_index
        assert breaker["max_score"] == pytest.approx(ref.max_score, abs=1e-5)
        assert breaker["max_score"] > breaker["threshold"]
        assert body["usage"]["completion_tokens"] == ref.token_index + 1


def test_streaming_with_a_probe(make_app, model, tokenizer, probe):
    ref = trip_setup(model, tokenizer, probe)
    with client_for(make_app, probe) as client:
        events, done = parse_sse(chat(client, max_tokens=N, stream=True).text)
    assert done
    token_events = [e for e in events[1:-1]]
    scores = [e["circuit_breaker"]["token_score"] for e in token_events]
    # one chunk per token before the trip, each with its score; the tripping token is never sent
    assert scores == pytest.approx(ref.scores[:ref.token_index], abs=1e-5)
    final = events[-1]
    assert final["choices"][0]["finish_reason"] == "content_filter"
    assert final["choices"][0]["delta"]["content"] == REFUSAL
    assert final["circuit_breaker"]["tripped"] is True and final["circuit_breaker"]["token_index"] == ref.token_index
    sent_before_trip = streamed_text(events[:-1])
    assert ref.halted_text.startswith(sent_before_trip)


def test_batched_requests_with_a_probe_match_the_monitor(make_app, model, tokenizer, probe):
    import asyncio

    import httpx

    prompts = [[{"role": "user", "content": f"Explain the water cycle {i}"}] for i in range(4)]
    refs = monitored_generate_batch(model, tokenizer, prompts, probe, max_new_tokens=N, refusal=REFUSAL)
    app = make_app(probe=probe, refusal=REFUSAL, batch_wait_ms=200)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json={
                "model": MODEL, "messages": p, "max_tokens": N}) for p in prompts))

    responses = asyncio.run(main())
    assert app.state.batcher.stats.batches < len(prompts)
    for response, ref in zip(responses, refs):
        body = response.json()
        assert body["choices"][0]["message"]["content"] == ref.text
        assert body["circuit_breaker"]["max_score"] == pytest.approx(ref.max_score, abs=1e-5)


def test_the_baseline_is_not_monitored(make_app, model, baseline_model, probe):
    probe.threshold_logit = -1e9  # trips at the first token
    with client_for(make_app, probe, baseline=baseline_model) as client:
        broken = chat(client, max_tokens=4).json()
        assert broken["choices"][0]["finish_reason"] == "content_filter"
        assert broken["circuit_breaker"]["token_index"] == 0
        base = chat(client, max_tokens=4, model=MODEL + "-baseline").json()
        assert "circuit_breaker" not in base and base["choices"][0]["finish_reason"] == "length"


def test_a_probe_for_another_model_is_refused(make_app):
    from circuit_breakers.probes.probe import ProbeError, make_probe

    wrong = make_probe("linear", 48, layer=1)
    wrong.threshold_logit = 0.0
    with pytest.raises(ProbeError):
        make_app(probe=wrong)
