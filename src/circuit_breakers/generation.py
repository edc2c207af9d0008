"""Batched generation with a chat template, optionally with a prefilled assistant turn."""

from __future__ import annotations

from typing import Sequence

import torch


def chat_prompt(tokenizer, conversation: list[dict], prefill: str = "") -> str:
    """The text a model sees: the chat template with the assistant header, then `prefill`."""
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return text + prefill


@torch.no_grad()
def generate(model, tokenizer, conversations: Sequence[list[dict]], *, prefills: Sequence[str] | None = None,
             max_new_tokens: int = 128, batch_size: int = 16, progress: bool = False, desc: str = "generating"
             ) -> list[str]:
    """Greedy completions, batched by similar prompt length; returns the new text only."""
    from tqdm.auto import tqdm

    prefills = list(prefills) if prefills is not None else [""] * len(conversations)
    texts = [chat_prompt(tokenizer, c, p) for c, p in zip(conversations, prefills)]
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    outputs: list[str] = [""] * len(texts)
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    try:
        for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc=desc):
            chunk = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
            new = generated[:, batch["input_ids"].shape[1]:]
            for i, row in zip(chunk, new):
                outputs[i] = tokenizer.decode(row, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs
