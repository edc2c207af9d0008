"""A small client for OpenAI-compatible endpoints (vLLM, llama.cpp server, TGI, OpenAI), for judges.

A judge endpoint is written `URL[#MODEL]`:
- `http://host:8000` or `http://host:8000/v1`: the API root; the judge picks completions or chat;
- `http://host:8000/v1/completions` or `.../v1/chat/completions`: that API;
- `#MODEL` names the served model (sent as "model"); without it the first id of GET /v1/models.
The API key comes from `CB_JUDGE_API_KEY`, else `OPENAI_API_KEY` (sent as a Bearer token when set).

Failures: a 4xx answer or a malformed body is `EndpointRejected` / `EndpointBadResponse` (the judge
records an "error" verdict for that item); an unreachable endpoint or 5xx after the retries is
`JudgeError` (the run stops; resuming continues where it stopped).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from .base import JudgeError

APIS = ("completions", "chat")


class EndpointRejected(Exception):
    """The endpoint answered 4xx to one request (e.g. a prompt longer than its context)."""


class EndpointBadResponse(Exception):
    """The endpoint answered, but not with an OpenAI-style body."""


def is_url(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(("http://", "https://"))


def _split(url: str) -> tuple[str, str | None, str | None]:
    """(API root ending in /v1 or as given, api or None, model or None)."""
    url, _, model = url.partition("#")
    url = url.rstrip("/")
    api = None
    if url.endswith("/chat/completions"):
        url, api = url[: -len("/chat/completions")], "chat"
    elif url.endswith("/completions"):
        url, api = url[: -len("/completions")], "completions"
    elif not url.endswith("/v1"):
        url += "/v1"
    return url, api, model or None


@dataclass
class Endpoint:
    url: str
    api: str | None = None  # None: the judge's default
    model: str | None = None
    api_key: str | None = None
    timeout: float = 120.0
    retries: int = 2
    backoff: float = 1.0
    client: Any = field(default=None, repr=False)  # an httpx.Client (tests pass one with a MockTransport)

    def __post_init__(self) -> None:
        root, api, model = _split(self.url)
        self.root = root
        self.api = self.api or api
        self.model = self.model or model
        if self.api is not None and self.api not in APIS:
            raise ValueError(f"api: expected completions or chat, got {self.api!r}")
        if self.api_key is None:
            self.api_key = os.environ.get("CB_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if self.client is None:
            try:
                import httpx
            except ImportError as err:  # pragma: no cover - httpx is in the dev extra, not a core dependency
                raise JudgeError("an endpoint judge needs httpx: pip install httpx") from err
            self.client = httpx.Client(timeout=self.timeout)

    def describe(self) -> dict:
        return {"endpoint": self.root, "api": self.api, "model": self.model}

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        import httpx

        url = self.root + path
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self.client.request(method, url, json=payload, headers=self._headers())
            except httpx.HTTPError as err:
                last = f"{type(err).__name__}: {err}"
                continue
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if response.status_code >= 400:
                raise EndpointRejected(f"HTTP {response.status_code} from {url}: {response.text[:300]}")
            try:
                body = response.json()
            except ValueError:
                raise EndpointBadResponse(f"{url} answered with non-JSON text: {response.text[:200]!r}") from None
            if not isinstance(body, dict):
                raise EndpointBadResponse(f"{url} answered with JSON {type(body).__name__}, expected an object")
            return body
        raise JudgeError(f"judge endpoint {url} unreachable after {self.retries + 1} tries ({last}); "
                         "start the server or fix --judge-model, then rerun: finished samples are kept")

    def served_model(self) -> str:
        """The model name to send: the configured one, else the first id of GET /models."""
        if self.model is None:
            try:
                body = self._request("GET", "/models")
                self.model = body["data"][0]["id"]
            except (EndpointRejected, EndpointBadResponse, KeyError, IndexError, TypeError) as err:
                raise JudgeError(f"{self.root}/models does not list a model ({err}); name it in the URL: "
                                 f"{self.root}#MODEL_NAME") from None
        return self.model

    def complete(self, *, prompt: str | None = None, messages: list[dict] | None = None, max_tokens: int,
                 api: str | None = None) -> str:
        """Greedy text from /completions (prompt) or /chat/completions (messages)."""
        api = api or self.api or ("chat" if messages is not None else "completions")
        payload: dict[str, Any] = {"model": self.served_model(), "max_tokens": max_tokens, "temperature": 0}
        if api == "chat":
            if messages is None:
                messages = [{"role": "user", "content": prompt or ""}]
            payload["messages"] = messages
            body = self._request("POST", "/chat/completions", payload)
        else:
            if prompt is None:
                raise ValueError("the completions API needs a prompt")
            payload["prompt"] = prompt
            body = self._request("POST", "/completions", payload)
        try:
            choice = body["choices"][0]
            text = choice["message"]["content"] if api == "chat" else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise EndpointBadResponse(f"no choices[0].{'message.content' if api == 'chat' else 'text'} in the "
                                      f"answer: {str(body)[:200]}") from None
        if not isinstance(text, str):
            raise EndpointBadResponse(f"the answer's text is {type(text).__name__}, expected a string")
        return text
