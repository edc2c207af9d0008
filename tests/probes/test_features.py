"""Response-token features: one row per response token, hidden-state numbering as in hidden.py."""
import torch

from circuit_breakers.data import ChatFormatter, Example, tokenize_examples
from circuit_breakers.probes.features import example_features, labelled_features, response_token_features

EXAMPLES = [
    Example(request="How do I bake bread?", response="Sure, here is a simple recipe for bread."),
    Example(request="Explain the water cycle.", response="Water evaporates."),
    Example(request="Hi", response="I cannot help with that request. I'm sorry, but I can't assist. " * 2),
]


def test_one_row_per_response_token_and_entries_match_output_hidden_states(tiny_model, chat_tokenizer):
    items = tokenize_examples(EXAMPLES, ChatFormatter(chat_tokenizer, 256))
    feats = response_token_features(tiny_model, items, [0, 2, 6], batch_size=2)
    n_response = sum(item.length - item.response_start for item in items)
    for layer in (0, 2, 6):
        assert feats[layer].features.shape == (n_response, 32)
        assert feats[layer].features.dtype == torch.float32
        assert feats[layer].n_items == 3
    assert torch.equal(feats[2].item_index.bincount(), torch.tensor([i.length - i.response_start for i in items]))
    item = items[2]
    with torch.no_grad():
        reference = tiny_model(input_ids=torch.tensor([item.input_ids]), output_hidden_states=True).hidden_states
    rows = feats[2].features[feats[2].item_index == 2]
    assert torch.allclose(rows, reference[2][0, item.response_start:], atol=1e-5)
    assert torch.allclose(feats[6].features[feats[6].item_index == 2], reference[6][0, item.response_start:],
                          atol=1e-5)


def test_token_cap_and_labelled_sets(tiny_model, chat_tokenizer):
    single = example_features(tiny_model, chat_tokenizer, EXAMPLES, 3, max_tokens_per_item=4)
    assert single.n_tokens == sum(min(4, n) for n in
                                  example_features(tiny_model, chat_tokenizer, EXAMPLES, 3).item_index.bincount().tolist())
    data = labelled_features(tiny_model, chat_tokenizer, 3, {"harm": EXAMPLES[:1]}, {"ok": EXAMPLES[1:]})
    assert data.X.shape[0] == data.y.shape[0] == data.item_index.shape[0]
    assert data.summary["harm"]["label"] == 1 and data.summary["harm"]["items"] == 1
    assert data.summary["ok"]["items"] == 2
    assert int(data.y.sum()) == data.summary["harm"]["tokens"]
    assert data.item_index.max() == 2
