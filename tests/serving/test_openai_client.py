"""The official `openai` client against a real uvicorn server on 127.0.0.1."""
import pytest

from ..helpers import HUMAN, MODEL

openai = pytest.importorskip("openai")


def test_openai_client(live_server):
    server = live_server()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="anything", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == [MODEL]

    completion = client.chat.completions.create(model=MODEL, messages=HUMAN, max_tokens=6)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 6
    text = completion.choices[0].message.content

    chunks = list(client.chat.completions.create(model=MODEL, messages=HUMAN, max_tokens=6, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == "length"

    # garak's wiring test through the client: empty prompt, its default stops, extra parameters
    garak = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ""}], max_tokens=6,
                                           stop=["#", ";"], temperature=0.7, seed=1,
                                           extra_body={"not_a_real_parameter": True})
    assert garak.choices[0].finish_reason in ("stop", "length")

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HUMAN, n=2)
    assert err.value.status_code == 400 and err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="nope", messages=HUMAN)
    assert err.value.code == "model_not_found"


def test_openai_client_with_a_key(live_server):
    server = live_server(api_key="k-123")
    good = openai.OpenAI(base_url=server.url + "/v1", api_key="k-123", max_retries=0, timeout=60)
    assert good.chat.completions.create(model=MODEL, messages=HUMAN, max_tokens=2).choices
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=HUMAN, max_tokens=2)
