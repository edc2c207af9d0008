"""Per-token hidden-state features of response tokens, the samples a harmfulness probe learns from.

Layers are numbered as hidden-state entries (`circuit_breakers.hidden`): entry l is the output of
block l-1, entry 0 the embeddings, and the last entry the final norm's output. Every response token
(from `response_start`, the end-of-turn tokens included) is one sample; the prompt is context only.
One forward per batch captures any number of layers and stops after the highest one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch

from ..batching import length_sorted_batches
from ..data.formatting import ChatFormatter, TokenizedExample, collate, tokenize_examples
from ..data.schema import Example
from ..hidden import decoder_hidden_states
from ..models import find_architecture


@dataclass
class TokenFeatures:
    """Response-token features of a list of items at one layer.

    `features` is (tokens, hidden) float32 on the CPU; `item_index[t]` is the item token t came from,
    so per-response scores are a max over the rows of one item.
    """

    features: torch.Tensor
    item_index: torch.Tensor
    n_items: int

    @property
    def n_tokens(self) -> int:
        return int(self.features.shape[0])


def truncate_response(item: TokenizedExample, max_tokens: int | None) -> TokenizedExample:
    """Keep the prompt and the first `max_tokens` response tokens."""
    if max_tokens is None or item.length - item.response_start <= max_tokens:
        return item
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_item must be at least 1, got {max_tokens}")
    return TokenizedExample(item.input_ids[: item.response_start + max_tokens], item.response_start, item.source)


@torch.no_grad()
def response_token_features(model, items: Sequence[TokenizedExample], layers: int | Iterable[int], *,
                            batch_size: int = 8, max_tokens_per_item: int | None = None,
                            pad_token_id: int = 0, blocks_path: str | None = None,
                            progress: bool = False, desc: str = "features"
                            ) -> TokenFeatures | dict[int, TokenFeatures]:
    """Hidden states of every response token at `layers` (one int: one TokenFeatures; several: a dict).

    Items are batched by similar length and right-padded; the model runs without gradients up to the
    highest layer only. Features come back as float32 on the CPU in item order.
    """
    from tqdm.auto import tqdm

    single = isinstance(layers, int)
    wanted = [layers] if single else sorted(set(layers))
    arch = find_architecture(model, blocks_path)
    n = arch.num_blocks
    for layer in wanted:
        if not 0 <= layer <= n:
            raise ValueError(f"layer must be in 0..{n} for a model with {n} blocks, got {layer}")
    items = [truncate_response(item, max_tokens_per_item) for item in items]
    device = next(model.parameters()).device
    per_item: dict[int, list[torch.Tensor | None]] = {layer: [None] * len(items) for layer in wanted}
    for chunk in tqdm(length_sorted_batches([item.length for item in items], batch_size), disable=not progress,
                      desc=desc):
        batch = collate([items[i] for i in chunk], pad_token_id)
        states = decoder_hidden_states(arch, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                       wanted, stop_early=True)
        for layer in wanted:
            hidden = states[layer].float().cpu()
            for row, i in enumerate(chunk):
                per_item[layer][i] = hidden[row, batch["response_mask"][row]]
    result = {}
    for layer in wanted:
        chunks = per_item[layer]
        hidden_size = chunks[0].shape[-1] if chunks else getattr(model.config, "hidden_size", 0)
        features = torch.cat(chunks) if chunks else torch.zeros(0, hidden_size)
        index = torch.cat([torch.full((len(c),), i, dtype=torch.long) for i, c in enumerate(chunks)]) \
            if chunks else torch.zeros(0, dtype=torch.long)
        result[layer] = TokenFeatures(features, index, len(items))
    return result[wanted[0]] if single else result


def example_features(model, tokenizer, examples: Sequence[Example], layers: int | Iterable[int], *,
                     max_length: int = 1024, max_tokens_per_item: int | None = None, batch_size: int = 8,
                     blocks_path: str | None = None, progress: bool = False, desc: str = "features"
                     ) -> TokenFeatures | dict[int, TokenFeatures]:
    """`response_token_features` of Examples, formatted with the tokenizer's chat template."""
    formatter = ChatFormatter(tokenizer, max_length)
    items = tokenize_examples(examples, formatter)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return response_token_features(model, items, layers, batch_size=batch_size, pad_token_id=pad,
                                   max_tokens_per_item=max_tokens_per_item, blocks_path=blocks_path,
                                   progress=progress, desc=desc)


@dataclass
class LabelledFeatures:
    """Features of positive and negative sets stacked: X (tokens, hidden), y (tokens,) in {0, 1}."""

    X: torch.Tensor
    y: torch.Tensor
    item_index: torch.Tensor  # item number within the whole stack, for per-response scores
    summary: dict = field(default_factory=dict)  # {set name: {"label", "items", "tokens"}}


def labelled_features(model, tokenizer, layer: int, positive: Mapping[str, Sequence[Example]],
                      negative: Mapping[str, Sequence[Example]], **kwargs) -> LabelledFeatures:
    """Features of every named set, labelled 1 (positive) or 0 (negative), with per-set counts."""
    xs, ys, indexes, summary = [], [], [], {}
    offset = 0
    for label, sets in ((1, positive), (0, negative)):
        for name, examples in sets.items():
            if name in summary:
                raise ValueError(f"set name {name!r} is both positive and negative")
            feats = example_features(model, tokenizer, examples, layer, desc=name, **kwargs)
            xs.append(feats.features)
            ys.append(torch.full((feats.n_tokens,), float(label)))
            indexes.append(feats.item_index + offset)
            offset += feats.n_items
            summary[name] = {"label": label, "items": feats.n_items, "tokens": feats.n_tokens}
    return LabelledFeatures(torch.cat(xs), torch.cat(ys), torch.cat(indexes), summary)
