"""The OpenAI-compatible endpoints on the tiny model: shapes, greedy answers, stop strings, streaming, keys."""
import asyncio

import httpx

from circuit_breakers.generation import generate

from ..helpers import HUMAN, MODEL, assert_error, chat, parse_sse, streamed_text


def test_health(client, make_app):
    from fastapi.testclient import TestClient

    assert client.get("/health").json() == {"status": "ok"}  # a keyless server shows no counters or limits
    with TestClient(make_app(api_key="k")) as keyed:
        assert keyed.get("/health").json() == {"status": "ok"}
        health = keyed.get("/health", headers={"Authorization": "Bearer k"}).json()
    assert health["status"] == "ok"
    assert health["model"] == MODEL and health["models"] == [MODEL]
    assert health["baseline"] is None and health["probe"] is None and health["auth_required"] is True


def test_models_lists_the_model_and_the_baseline(make_app, baseline_model):
    from fastapi.testclient import TestClient

    with TestClient(make_app(baseline=baseline_model)) as client:
        listing = client.get("/v1/models").json()
        assert listing["object"] == "list"
        assert [m["id"] for m in listing["data"]] == [MODEL, MODEL + "-baseline"]
        for entry in listing["data"]:
            assert entry["object"] == "model" and isinstance(entry["created"], int) and entry["owned_by"]
        assert client.get(f"/v1/models/{MODEL}-baseline").json()["id"] == MODEL + "-baseline"
        assert_error(client.get("/v1/models/nope"), 404, code="model_not_found")
        # the two models are different models
        a = chat(client, max_tokens=6).json()["choices"][0]["message"]["content"]
        b = chat(client, max_tokens=6, model=MODEL + "-baseline").json()
        assert b["model"] == MODEL + "-baseline" and b["choices"][0]["message"]["content"] != a


def test_completion_shape_and_greedy_answer(client, model, tokenizer):
    response = chat(client, max_tokens=10)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length"  # a random model does not say </s> within 10 tokens
    usage = body["usage"]
    assert usage["completion_tokens"] == 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "circuit_breaker" not in body  # no probe
    # the same text as the project's batched greedy generation
    assert choice["message"]["content"] == generate(model, tokenizer, [HUMAN], max_new_tokens=10)[0]
    # greedy is deterministic, and temperature 0 is greedy
    assert chat(client, max_tokens=10, temperature=0).json()["choices"][0] == choice


def test_max_completion_tokens(client):
    body = chat(client, max_tokens=None, max_completion_tokens=3).json()
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"


def test_content_parts_and_roles(client):
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "How do I "}, {"type": "text", "text": "bake?"}]},
             {"role": "assistant", "content": "Like this."}, {"role": "user", "content": "And then?"}]
    assert chat(client, parts).status_code == 200


def test_stop_strings_trim_the_output(client):
    full = chat(client, max_tokens=16).json()["choices"][0]["message"]["content"]
    assert len(full) > 6
    stop = full[3:5]
    cut = full.index(stop)
    for value in (stop, [stop], ["never-there", stop], ["#", ";", stop]):
        body = chat(client, max_tokens=16, stop=value).json()
        choice = body["choices"][0]
        assert choice["message"]["content"] == full[:cut], value
        assert choice["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] < 16  # generation stopped, not just trimmed
    # a stop string that never appears changes nothing
    assert chat(client, max_tokens=16, stop=["never-there"]).json()["choices"][0]["message"]["content"] == full


def test_sampling_with_a_seed_is_reproducible(client):
    a = chat(client, max_tokens=12, temperature=1.0, top_p=0.9, seed=7).json()["choices"][0]["message"]["content"]
    b = chat(client, max_tokens=12, temperature=1.0, top_p=0.9, seed=7).json()["choices"][0]["message"]["content"]
    assert a == b
    others = {chat(client, max_tokens=12, temperature=1.5, seed=s).json()["choices"][0]["message"]["content"]
              for s in range(4)}
    assert len(others) > 1


def test_streaming(client):
    expected = chat(client, max_tokens=10).json()["choices"][0]["message"]["content"]
    response = chat(client, max_tokens=10, stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events, done = parse_sse(response.text)
    assert done
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    ids = {e["id"] for e in events}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for event in events:
        assert event["object"] == "chat.completion.chunk" and event["model"] == MODEL
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == "length"
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    assert streamed_text(events) == expected


def test_streaming_with_stop_and_usage(client):
    full = chat(client, max_tokens=16).json()["choices"][0]["message"]["content"]
    stop = full[4:6]
    expected = full[:full.index(stop)]
    response = chat(client, max_tokens=16, stop=[stop], stream=True, stream_options={"include_usage": True})
    events, done = parse_sse(response.text)
    assert done
    usage_event = events[-1]
    assert usage_event["choices"] == [] and usage_event["usage"]["completion_tokens"] < 16
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert streamed_text(events) == expected


def test_api_key(make_app):
    from fastapi.testclient import TestClient

    with TestClient(make_app(api_key="s3cret")) as client:
        assert_error(chat(client), 401, code="invalid_api_key")
        assert_error(client.post("/v1/chat/completions", json={"messages": HUMAN},
                                 headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
        assert_error(client.post("/v1/chat/completions", json={"messages": HUMAN},
                                 headers={"Authorization": "s3cret"}), 401)
        assert_error(client.get("/v1/models"), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/chat/completions", json={"messages": HUMAN, "max_tokens": 2},
                           headers=good).status_code == 200
        assert client.get("/v1/models", headers=good).status_code == 200
        # the key is checked before the body: a keyless bad request is a 401, not a 400
        assert client.post("/v1/chat/completions", content=b"{").status_code == 401
        # the playground and /health need no key; /health says more only to the key
        assert client.get("/").status_code == 200
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/health", headers=good).json()["auth_required"] is True


def test_garak_style_request(client):
    """garak's wiring test: an empty prompt, stop ["#", ";"], parameters we do not know, and a key
    that this server (configured without one) does not need."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": ""}], "max_tokens": 150,
            "stop": ["#", ";"], "temperature": 0.7, "top_p": 1.0, "frequency_penalty": 0.0,
            "presence_penalty": 0.0, "seed": None, "n": 1, "logit_bias": None, "user": "garak",
            "some_future_parameter": {"x": 1}}
    response = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer garak-dummy"})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert "#" not in choice["message"]["content"] and ";" not in choice["message"]["content"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(make_app):
    app = make_app(batch_size=8, batch_wait_ms=200)
    prompts = [[{"role": "user", "content": f"Explain the water cycle {i}"}] for i in range(8)]

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            async def ask(messages, **extra):
                response = await client.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": messages, "max_tokens": 6, **extra})
                return response
            together = await asyncio.gather(*(ask(p) for p in prompts))
            batches = app.state.batcher.stats.batches
            alone = [await ask(p) for p in prompts]
            return together, batches, alone

    together, batches, alone = asyncio.run(main())
    assert all(r.status_code == 200 for r in together)
    assert batches < len(prompts)
    for r, a in zip(together, alone):  # batched answers are each request's own
        assert r.json()["choices"][0]["message"]["content"] == a.json()["choices"][0]["message"]["content"]
    assert app.state.batcher.stats.largest > 1


def test_event_loop_answers_while_generating(make_app):
    app = make_app()

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            long = asyncio.create_task(client.post("/v1/chat/completions", json={
                "messages": HUMAN, "max_tokens": 200}))
            await asyncio.sleep(0.05)
            health = await client.get("/health")
            still_running = not long.done()
            return health, still_running, await long

    health, still_running, long = asyncio.run(main())
    assert health.status_code == 200 and still_running and long.status_code == 200


def test_a_failing_generation_is_a_500_and_the_server_survives(make_app, monkeypatch):
    from fastapi.testclient import TestClient

    from circuit_breakers.serving import app as app_module

    real = app_module.BatchGeneration
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(app_module, "BatchGeneration", flaky)
    with TestClient(make_app()) as client:
        response = chat(client)
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "server_error" and "boom" in response.json()["error"]["message"]
        assert chat(client).status_code == 200


def test_playground_is_served(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "circuit-breakers playground" in page and "v1/chat/completions" in page
    assert "http://" not in page and "https://" not in page  # self-contained: no CDN


def test_a_stream_whose_client_leaves_stops_generating(live_server, monkeypatch):
    import time

    from circuit_breakers.serving import app as app_module

    finished = []

    class Recording(app_module.BatchGeneration):
        def step(self):
            results = super().step()
            finished.extend(results.values())
            return results

    monkeypatch.setattr(app_module, "BatchGeneration", Recording)
    server = live_server()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json={
                "messages": HUMAN, "max_tokens": 220, "stream": True}) as response:
            assert response.status_code == 200
            contents = 0
            for line in response.iter_lines():
                contents += '"content": ""' not in line and '"content"' in line
                if contents == 3:
                    break  # generation is under way: leave
    deadline = time.monotonic() + 60
    while not finished and time.monotonic() < deadline:
        time.sleep(0.05)
    assert finished and finished[0].completion_tokens < 220
