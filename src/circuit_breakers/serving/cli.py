"""`circuit-breakers serve`: an OpenAI-compatible server and a browser playground for a model.

    circuit-breakers serve --model runs/demo/model --probe runs/probe --baseline smollm2-135m
    CB_API_KEY=secret circuit-breakers serve --model runs/demo/model --api-key-env CB_API_KEY

Binds to 127.0.0.1 unless --host says otherwise; another address without an API key is refused unless
--allow-no-key says so. The API key is read from the environment variable that --api-key-env names,
never from the command line (where `ps` would show it). Requests are bounded: --max-queue waiting,
--request-timeout seconds each, --max-total-tokens of prompt and answer each.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from .protocol import (DEFAULT_MAX_INPUT_TOKENS, DEFAULT_MAX_QUEUE, DEFAULT_MAX_TOKENS_LIMIT, DEFAULT_MAX_TOTAL_TOKENS,
                       DEFAULT_REQUEST_TIMEOUT)


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible API with a browser playground",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)  # `--api-key SECRET` must be an error, not an abbreviation of --api-key-env
    serve.add_argument("--model", required=True,
                       help="the circuit-broken model: hub id, checkpoint directory, .gguf file or smollm2-135m")
    serve.add_argument("--model-name", help="the name clients ask for (default: derived from --model)")
    serve.add_argument("--probe", help="a probe directory (probe.json + probe.safetensors) that monitors generations")
    serve.add_argument("--baseline", help="the original model, served as <model-name>-baseline")
    serve.add_argument("--refusal", help="what a tripped generation answers (default: a short refusal)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key-env", metavar="VAR",
                       help="name of an environment variable holding the API key clients must send")
    serve.add_argument("--allow-no-key", action="store_true",
                       help="serve a non-loopback --host without an API key (refused otherwise: anyone who can "
                            "reach the address could use the model)")
    serve.add_argument("--allowed-hosts", metavar="NAMES", default="",
                       help="comma-separated names the Host header may give besides the bound address and "
                            "localhost/127.0.0.1/[::1] ('*.example.com' for a domain, '*' for any; a wildcard "
                            "--host such as 0.0.0.0 also accepts any IP address) (default: none)")
    serve.add_argument("--max-tokens-limit", type=int, default=DEFAULT_MAX_TOKENS_LIMIT,
                       help="largest max_tokens a request may ask (default: %(default)s)")
    serve.add_argument("--max-input-tokens", type=int, default=DEFAULT_MAX_INPUT_TOKENS,
                       help="longest prompt, in tokens (default: %(default)s)")
    serve.add_argument("--max-total-tokens", type=int, default=DEFAULT_MAX_TOTAL_TOKENS,
                       help="prompt + max_tokens of one request, in tokens (default: %(default)s)")
    serve.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                       help="requests waiting for generation; more are answered 429 with Retry-After "
                            "(default: %(default)s)")
    serve.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT, metavar="SECONDS",
                       help="time from a request's arrival to its last token; a request still generating then "
                            "is stopped and answered 504 (default: %(default)g)")
    serve.add_argument("--batch-size", type=int, default=8, help="most requests generated together (default: 8)")
    serve.add_argument("--batch-wait-ms", type=float, default=10,
                       help="how long a request waits for others (default: 10)")
    serve.add_argument("--device", default="auto")
    serve.add_argument("--dtype", default="auto")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def model_name_for(spec: str) -> str:
    from pathlib import Path

    path = Path(spec)
    if path.exists():
        # runs/demo/model -> "demo" reads better than "model"
        name = path.parent.name if path.name in ("model", "merged") and path.parent.name else path.name
        return name.removesuffix(".gguf") or spec
    return spec


def run(args) -> int:
    api_key = None
    if args.api_key_env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", args.api_key_env):
            # Not echoed: it may be the key itself, given where the variable's name belongs.
            print("circuit-breakers serve: error: --api-key-env takes the NAME of an environment variable "
                  "that holds the key, not the key", file=sys.stderr)
            return 2
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(f"circuit-breakers serve: error: --api-key-env {args.api_key_env}: the variable is not set or "
                  "empty", file=sys.stderr)
            return 2
    for flag in ("max_tokens_limit", "max_input_tokens", "max_total_tokens", "max_queue", "batch_size"):
        if getattr(args, flag) < 1:
            print(f"circuit-breakers serve: error: --{flag.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    if not args.request_timeout > 0:
        print("circuit-breakers serve: error: --request-timeout must be more than 0 seconds", file=sys.stderr)
        return 2

    from .guards import is_loopback

    if api_key is None and not is_loopback(args.host):
        if not args.allow_no_key:
            print(f"circuit-breakers serve: error: --host {args.host} listens beyond this machine and no API key is "
                  "set: anyone who can reach it could use the model. Set one with --api-key-env VAR, or pass "
                  "--allow-no-key if every client that can reach this address may use it.", file=sys.stderr)
            return 2
        print(f"WARNING: serving on {args.host} WITHOUT AN API KEY (--allow-no-key): anyone who can reach this "
              "address can use the model.", file=sys.stderr)

    import uvicorn

    from ..models import load_model
    from .app import DEFAULT_REFUSAL, create_app

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    baseline = load_model(args.baseline, dtype=args.dtype, device=args.device) if args.baseline else None
    name = args.model_name or model_name_for(args.model)
    try:
        probe = None
        if args.probe:
            from ..probes.probe import load_probe
            probe = load_probe(args.probe, device=str(next(model.parameters()).device))
        app = create_app(model, tokenizer, model_name=name, probe=probe, baseline=baseline, api_key=api_key,
                         max_tokens_limit=args.max_tokens_limit, max_input_tokens=args.max_input_tokens,
                         max_total_tokens=args.max_total_tokens, max_queue=args.max_queue,
                         request_timeout=args.request_timeout, batch_size=args.batch_size,
                         batch_wait_ms=args.batch_wait_ms, refusal=args.refusal or DEFAULT_REFUSAL,
                         host=args.host, allowed_hosts=args.allowed_hosts.split(","))
    except ValueError as err:
        print(f"circuit-breakers serve: error: {err}", file=sys.stderr)
        return 2
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {name}" + (f" and {name}-baseline" if baseline else "") + (" with a probe" if probe else "")
          + f" at http://{shown}:{args.port}/v1 (playground: http://{shown}:{args.port}/)"
          + (" - API key required" if api_key else ""), file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
