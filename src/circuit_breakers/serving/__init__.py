"""An OpenAI-compatible HTTP server for circuit-broken models, with a browser playground.

    circuit-breakers serve --model runs/demo/model [--probe runs/probe] [--baseline smollm2-135m]

`create_app(model, tokenizer, model_name=...)` builds the FastAPI application; see docs/serving.md.
Importing this package imports nothing heavy: FastAPI and torch load with `serving.app`.
"""

from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name):
    if name == "create_app":
        from .app import create_app
        return create_app
    raise AttributeError(name)
