"""Load test of the OpenAI-compatible server: N concurrent clients over loopback HTTP.

    python benchmarks/load.py                                   # a tiny random model built here, seconds
    python benchmarks/load.py --model smollm2-135m --clients 8 --requests 4 --max-tokens 32
    python benchmarks/load.py --url http://127.0.0.1:8000 --model-name demo --api-key-env CB_API_KEY

Without --url the server runs in this process (uvicorn in a thread on 127.0.0.1, a free port) with the
model that --model names (`circuit_breakers.models.load_model`), or, by default, a randomly initialised
tiny Llama with an in-memory tokenizer (no download). Every client (asyncio + httpx) sends its requests
one after another; the run is bounded by --requests per client and by --duration seconds (requests not
started by then are not sent; requests still running at the deadline plus --grace count as errors).

Prints throughput (requests/s, completion tokens/s), latency p50/p99, the error count and, in-process,
how the server batched; --json writes the same figures. Exit status 1 when any request failed.

    python benchmarks/load.py --model smollm2-135m --hostile --requests 2 --max-tokens 32

--hostile (64 clients unless --clients says otherwise) runs the same load twice against the same server,
in one process (--rounds times, interleaved): without, then with one hostile request sent at the start
beside the clients, the longest the server accepts (in-process: prompt + max_tokens filling
--max-total-tokens or the model's context,
max_tokens a quarter of it up to the limit; --hostile-prompt-tokens and --hostile-max-tokens override;
with --url the prompt is that many words). It reports the other clients' p50/p99 latency, rejections
(429) and errors in both runs, their ratios (with / without; the median over rounds), and what became of
the hostile request.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import sys
import threading
import time

PROMPTS = [
    "Explain the water cycle in three short sentences.",
    "How do I bake a simple loaf of bread?",
    "Give me three tips for a job interview.",
    "What is the difference between weather and climate?",
    "Write a haiku about autumn.",
    "How do vaccines train the immune system?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What are good habits for writing readable code?",
]

TINY_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_model_and_tokenizer():
    """A random 4-block Llama and a byte-level BPE tokenizer trained in memory on the prompts."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(PROMPTS * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = TINY_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), tokenizer


class InProcessServer:
    """uvicorn on 127.0.0.1 with a free port, in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-q * len(ordered) // 100)))
    return ordered[int(rank) - 1]


class Rejected(RuntimeError):
    """The server answered 429: its queue is full."""


def hostile_prompt(tokenizer, tokens: int) -> str:
    """Words of the prompts, as many as fit in `tokens` tokens after the chat template (None: one per token)."""
    words = list(itertools.islice(itertools.cycle(" ".join(PROMPTS).split()), tokens))
    if tokenizer is None:
        return " ".join(words)
    from circuit_breakers.generation import chat_prompt

    def length(n: int) -> int:
        text = chat_prompt(tokenizer, [{"role": "user", "content": " ".join(words[:n])}])
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    low, high = 1, len(words)  # the most words that fit: every word is at least one token
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if length(middle) <= tokens else (low, middle - 1)
    return " ".join(words[:low])


async def run_clients(url: str, model_name: str, *, clients: int, requests: int, duration: float, grace: float,
                      max_tokens: int, api_key: str | None, stream: bool, hostile: dict | None = None) -> dict:
    """The clients' figures; with `hostile` (a request body), that request is sent once at the start beside
    them, is not counted among them, and is waited for (within --duration + --grace) after them."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies: list[float] = []
    tokens = 0
    not_sent = 0
    rejected = 0
    errors: list[str] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    stop_at = start + duration

    async def one(client: httpx.AsyncClient, prompt: str) -> int:
        body = {"model": model_name, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "temperature": 0}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
            used = 0
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        event = json.loads(line[6:])
                        if "error" in event:
                            raise RuntimeError(event["error"]["message"])
                        if event.get("usage"):
                            used = event["usage"]["completion_tokens"]
            return used
        response = await client.post("/v1/chat/completions", json=body)
        if response.status_code == 429:
            raise Rejected(response.headers.get("Retry-After"))
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        return response.json()["usage"]["completion_tokens"]

    async def client_loop(index: int, client: httpx.AsyncClient) -> None:
        nonlocal tokens, not_sent, rejected
        for k in range(requests):
            if time.perf_counter() >= stop_at:
                not_sent += requests - k
                return
            t0 = time.perf_counter()
            try:
                used = await one(client, PROMPTS[(index + k * clients) % len(PROMPTS)])
                tokens += used  # not `tokens += await ...`: that reads `tokens` before awaiting
                latencies.append(time.perf_counter() - t0)
            except Rejected:
                rejected += 1
            except Exception as err:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(err).__name__}: {err}")

    async def hostile_request(client: httpx.AsyncClient) -> dict:
        t0 = time.perf_counter()
        try:
            response = await client.post("/v1/chat/completions", json=hostile)
        except Exception as err:  # noqa: BLE001 - reported
            return {"hostile_status": type(err).__name__, "hostile_s": time.perf_counter() - t0}
        outcome = {"hostile_status": response.status_code, "hostile_s": time.perf_counter() - t0}
        if response.status_code == 200:
            usage = response.json()["usage"]
            outcome |= {"hostile_prompt_tokens": usage["prompt_tokens"],
                        "hostile_completion_tokens": usage["completion_tokens"]}
        else:
            outcome["hostile_error"] = response.json().get("error", {}).get("message", response.text[:200])
        return outcome

    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=duration + grace, limits=limits) as client:
        if hostile is not None:
            hostile_task = asyncio.create_task(hostile_request(client))
            await asyncio.sleep(0)  # sent first: it is the oldest request in the queue
        tasks = [asyncio.create_task(client_loop(i, client)) for i in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=duration + grace)
        for task in pending:
            task.cancel()
            errors.append("still running at the deadline")
        wall = time.perf_counter() - start
        # With the server in this process and fixed torch threads, a drop between runs is the neighbours' load.
        cpu_per_wall = (time.process_time() - cpu_start) / wall
        outcome = {}
        if hostile is not None:
            try:
                outcome = await asyncio.wait_for(hostile_task, max(1.0, start + duration + grace - time.perf_counter()))
            except asyncio.TimeoutError:
                outcome = {"hostile_status": "still running at the deadline", "hostile_s": time.perf_counter() - start}
    return {"requests_ok": len(latencies), "rejected": rejected, "errors": len(errors), "not_sent": not_sent,
            "error_samples": errors[:5],
            "wall_s": wall, "requests_per_s": len(latencies) / wall, "completion_tokens": tokens,
            "tokens_per_s": tokens / wall, "latency_p50_s": percentile(latencies, 50),
            "latency_p99_s": percentile(latencies, 99),
            "latency_mean_s": statistics.fmean(latencies) if latencies else None, "process_cpu_per_wall": cpu_per_wall,
            **outcome}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one in this process)")
    parser.add_argument("--model", help="in-process: hub id, directory, .gguf or smollm2-135m (default: tiny random)")
    parser.add_argument("--model-name", help="the model name to request (default: the served one)")
    parser.add_argument("--api-key-env", metavar="VAR", help="environment variable with the key to send")
    parser.add_argument("--clients", type=int, help="concurrent clients (default: 8; 64 with --hostile)")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--duration", type=float, default=300, help="stop sending new requests after this (s)")
    parser.add_argument("--grace", type=float, default=120, help="after --duration, wait this long for answers (s)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stream", action="store_true", help="streaming requests")
    parser.add_argument("--batch-size", type=int, default=8, help="in-process server's batch size")
    parser.add_argument("--batch-wait-ms", type=float, default=10)
    parser.add_argument("--threads", type=int, help="torch threads for the in-process model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--hostile", action="store_true",
                        help="run twice, without and with one hostile long request beside the clients")
    parser.add_argument("--rounds", type=int, default=1, help="with --hostile: pairs of runs, interleaved")
    parser.add_argument("--hostile-prompt-tokens", type=int, help="the hostile prompt's length (default: see above)")
    parser.add_argument("--hostile-max-tokens", type=int, help="the hostile request's max_tokens (default: see above)")
    parser.add_argument("--json", help="write the figures here")
    return parser


def hostile_size(args, limits: dict, context: int | None) -> tuple[int, int]:
    """(prompt tokens, max_tokens) of the hostile request: the longest the server accepts, unless given."""
    fit = min(limits["max_total_tokens"], context or limits["max_total_tokens"])
    max_tokens = args.hostile_max_tokens or min(limits["max_tokens_limit"], fit // 4)
    prompt = args.hostile_prompt_tokens or min(limits["max_input_tokens"], fit - max_tokens)
    return prompt, max_tokens


def print_run(result: dict, args) -> None:
    fmt = lambda x, unit="": "-" if x is None else f"{x:.3g}{unit}"  # noqa: E731
    print(f"{result['requests_ok']} requests ok, {result['rejected']} rejected (429), {result['errors']} errors, "
          f"{result['not_sent']} not sent (--duration) in {result['wall_s']:.1f} s "
          f"({args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}"
          f"{', streaming' if args.stream else ''})")
    print(f"throughput: {result['requests_per_s']:.3g} req/s, {result['tokens_per_s']:.3g} completion tokens/s")
    print(f"latency: p50 {fmt(result['latency_p50_s'], ' s')}, p99 {fmt(result['latency_p99_s'], ' s')}")
    print(f"this process used {result['process_cpu_per_wall']:.2f} CPU seconds per wall second")
    if "server_batches" in result:
        print(f"server: {result['server_batches']} batches, mean size {fmt(result['mean_batch_size'])}")
    if "hostile_status" in result:
        print(f"hostile request: {result['hostile_status']} after {result['hostile_s']:.1f} s"
              + (f" ({result['hostile_completion_tokens']} tokens)" if "hostile_completion_tokens" in result else "")
              + (f": {result['hostile_error']}" if "hostile_error" in result else ""))
    for sample in result["error_samples"]:
        print(f"error: {sample}", file=sys.stderr)


def ratio(a, b) -> float | None:
    return None if a is None or not b else a / b


def measure_rounds(args, info: dict, measured, hostile: dict | None) -> dict:
    """One run; with --hostile, --rounds pairs of runs without and with the hostile request, interleaved so
    that a neighbour's load hits both alike, and the median of the paired ratios."""
    if hostile is None:
        result = {**info, **measured(None)}
        print_run(result, args)
        return result
    rounds = []
    for k in range(args.rounds):
        pair = {}
        for label, body in (("without", None), ("with", hostile)):
            pair[label] = measured(body)
            print(f"--- round {k + 1}, {label} the hostile request")
            print_run(pair[label], args)
        pair |= {f"ratio_{q}": ratio(pair["with"][f"latency_{q}_s"], pair["without"][f"latency_{q}_s"])
                 for q in ("p50", "p99")}
        rounds.append(pair)
    median = lambda xs: None if None in xs else statistics.median(xs)  # noqa: E731
    result = {**info, "rounds": rounds, "ratio_p50": median([r["ratio_p50"] for r in rounds]),
              "ratio_p99": median([r["ratio_p99"] for r in rounds])}
    fmt = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
    print(f"other clients, with / without (median of {len(rounds)} rounds): p50 {fmt(result['ratio_p50'])}, "
          f"p99 {fmt(result['ratio_p99'])}; per round p99 {', '.join(fmt(r['ratio_p99']) for r in rounds)}; "
          f"rejected {sum(r['with']['rejected'] for r in rounds)} / {sum(r['without']['rejected'] for r in rounds)}")
    return result


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.clients is None:
        args.clients = 64 if args.hostile else 8
    if args.clients < 1 or args.requests < 1 or args.max_tokens < 1 or args.rounds < 1:
        print("load.py: --clients, --requests, --max-tokens and --rounds must be at least 1", file=sys.stderr)
        return 2
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    info = {"clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
            "stream": args.stream, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"}

    async def go(url: str, name: str, hostile: dict | None = None) -> dict:
        return await run_clients(url, name, clients=args.clients, requests=args.requests, duration=args.duration,
                                 grace=args.grace, max_tokens=args.max_tokens, api_key=api_key, stream=args.stream,
                                 hostile=hostile)

    def hostile_body(name: str, tokenizer, prompt_tokens: int, max_tokens: int) -> dict:
        return {"model": name, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": hostile_prompt(tokenizer, prompt_tokens)}]}

    if args.url:
        if not args.model_name:
            import httpx
            listing = httpx.get(args.url.rstrip("/") + "/v1/models",
                                headers={"Authorization": f"Bearer {api_key}"} if api_key else {}).json()
            args.model_name = listing["data"][0]["id"]
        info |= {"url": args.url, "model": args.model_name}
        url, name = args.url.rstrip("/"), args.model_name
        prompt, max_tokens = args.hostile_prompt_tokens or 3000, args.hostile_max_tokens or 1024
        hostile = hostile_body(name, None, prompt, max_tokens) if args.hostile else None
        info |= {"hostile_prompt_words": prompt, "hostile_max_tokens": max_tokens} if args.hostile else {}
        result = measure_rounds(args, info, lambda with_hostile: asyncio.run(go(url, name, with_hostile)), hostile)
    else:
        import torch

        from circuit_breakers.serving.app import create_app
        from circuit_breakers.serving.protocol import DEFAULT_MAX_INPUT_TOKENS, DEFAULT_MAX_TOTAL_TOKENS

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.model:
            from circuit_breakers.models import load_model
            model, tokenizer = load_model(args.model, device=args.device)
            name = args.model_name or args.model
        else:
            model, tokenizer = tiny_model_and_tokenizer()
            name = args.model_name or "tiny-random"
        device = next(model.parameters()).device
        limits = {"max_tokens_limit": max(1024, args.max_tokens), "max_input_tokens": DEFAULT_MAX_INPUT_TOKENS,
                  "max_total_tokens": DEFAULT_MAX_TOTAL_TOKENS}  # the others: create_app's (the serve CLI's) defaults
        info |= {"model": args.model or "tiny-random (4 blocks, hidden 64)", "device": str(device),
                 "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size,
                 "batch_wait_ms": args.batch_wait_ms}
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
        app = create_app(model, tokenizer, model_name=name, api_key=api_key, batch_size=args.batch_size,
                         batch_wait_ms=args.batch_wait_ms, **limits)
        hostile = None
        if args.hostile:
            prompt, max_tokens = hostile_size(args, limits, app.state.targets[name].context)
            info |= {"hostile_prompt_tokens": prompt, "hostile_max_tokens": max_tokens,
                     "request_timeout_s": app.state.request_timeout}
            hostile = hostile_body(name, tokenizer, prompt, max_tokens)
        with InProcessServer(app) as url:
            asyncio.run(run_clients(url, name, clients=1, requests=1, duration=60, grace=120,  # warm-up
                                    max_tokens=2, api_key=api_key, stream=False))
            stats = app.state.batcher.stats

            def measured(with_hostile: dict | None) -> dict:
                before_batches, before_jobs = stats.batches, stats.jobs
                result = asyncio.run(go(url, name, with_hostile))
                batches, jobs = stats.batches - before_batches, stats.jobs - before_jobs
                return result | {"server_batches": batches, "mean_batch_size": jobs / batches if batches else None}

            result = measure_rounds(args, info, measured, hostile)
    failed = (result["errors"] or result["rejected"] if not args.hostile else
              any(r[k]["errors"] for r in result["rounds"] for k in ("without", "with")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
