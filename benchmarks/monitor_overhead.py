"""Cost per generated token of the probe monitor: greedy `generate` with and without it, same prompts.

    python benchmarks/monitor_overhead.py                                   # tiny random model, seconds
    python benchmarks/monitor_overhead.py --model smollm2-135m --prompts 4 --max-new-tokens 32

Variants, run interleaved (plain, monitored, stream, plain, ...) so that machine noise hits all alike:

* plain: `model.generate` (greedy, KV cache), the prompts in batches of --batch-size, left-padded.
* monitored: `monitored_generate_batch` on the same batches (forward hook + StoppingCriteria + the
  extra single-token forward, stopped at the probe's layer, that scores the last token).
* stream: `monitored_stream`, one prompt at a time (the manual greedy loop with a KV cache).

Every variant generates exactly --max-new-tokens per prompt (`min_new_tokens` holds off the end
token, in the stream too), with a probe whose threshold is never crossed, so all
produce the same tokens. Prints the median ms/token over --repeats and the overhead ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from circuit_breakers.generation import chat_prompt
from circuit_breakers.models import find_architecture, load_model
from circuit_breakers.probes import load_probe, make_probe
from circuit_breakers.probes.monitor import monitored_generate_batch, monitored_stream

PROMPTS = [
    "Explain the water cycle in three short sentences.",
    "How do I bake bread at home?",
    "Write a haiku about autumn leaves.",
    "What are the health benefits of regular exercise?",
    "Summarise the plot of Romeo and Juliet.",
    "Give me three tips for learning a new language.",
    "How does a refrigerator keep food cold?",
    "Describe how to change a flat bicycle tyre.",
]

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_model_and_tokenizer():
    """A random 4-block Llama and a byte-level BPE tokenizer with a ChatML template (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>",
                                                                  "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(PROMPTS * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


@torch.no_grad()
def plain(model, tokenizer, prompts, max_new_tokens, batch_size) -> int:
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    tokens = 0
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [chat_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts[start:start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            tokens += (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    finally:
        tokenizer.padding_side = side
    return tokens


def monitored(model, tokenizer, prompts, probe, max_new_tokens, batch_size) -> int:
    results = monitored_generate_batch(model, tokenizer, prompts, probe, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, min_new_tokens=max_new_tokens)
    assert not any(r.tripped for r in results)
    return sum(len(r.scores) for r in results)


def stream(model, tokenizer, prompts, probe, max_new_tokens) -> int:
    tokens = 0
    for prompt in prompts:
        items = list(monitored_stream(model, tokenizer, prompt, probe, max_new_tokens=max_new_tokens,
                                      min_new_tokens=max_new_tokens))
        tokens += len(items) - 1
    return tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (random, no download) or any --model value")
    parser.add_argument("--probe", help="a probe directory (default: a random never-tripping probe)")
    parser.add_argument("--kind", choices=("linear", "mlp"), default="linear")
    parser.add_argument("--layer", type=int, help="default: the middle of the stack")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-stream", action="store_true", help="skip the manual streaming loop")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model == "tiny":
        model, tokenizer = tiny_model_and_tokenizer()
    else:
        model, tokenizer = load_model(args.model)
    if args.probe:
        probe = load_probe(args.probe)
        probe.threshold_logit = 1e9  # never trips: every variant generates the same tokens
    else:
        layer = args.layer if args.layer is not None else find_architecture(model).num_blocks // 2
        probe = make_probe(args.kind, model.config.hidden_size, layer=layer)
        probe.threshold_logit = 1e9
    prompts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]
    device = next(model.parameters()).device
    print(f"model {args.model} on {device} ({torch.get_num_threads()} threads), {probe.kind} probe at layer "
          f"{probe.layer}, {len(prompts)} prompts x {args.max_new_tokens} tokens, batch {args.batch_size}")

    variants = {"plain": lambda: plain(model, tokenizer, prompts, args.max_new_tokens, args.batch_size),
                "monitored": lambda: monitored(model, tokenizer, prompts, probe, args.max_new_tokens,
                                               args.batch_size)}
    if not args.no_stream:
        variants["stream"] = lambda: stream(model, tokenizer, prompts, probe, args.max_new_tokens)
    for run in variants.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            tokens = run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) * 1000 / tokens)
    base = statistics.median(times["plain"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:>10}: {median:8.2f} ms/token (runs: {', '.join(f'{v:.2f}' for v in values)})"
              f"   x{median / base:.3f} of plain")
    return 0


if __name__ == "__main__":
    sys.exit(main())
