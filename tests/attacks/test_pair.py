import json

import pytest

from circuit_breakers.attacks.base import budget_of
from circuit_breakers.attacks.pair import PAIR, LocalAttacker, PairConfig, parse_attacker_reply


class FakeAttacker:
    def __init__(self):
        self.calls = []

    def __call__(self, messages):
        self.calls.append(messages)
        return json.dumps({"improvement": "try again", "prompt": f"attempt {len(self.calls)}"})


def test_pair_stops_as_soon_as_the_score_passes(llama, tok, behaviors):
    attacker = FakeAttacker()
    scores = iter([0.1, 0.2, 0.9, 0.0, 0.0, 0.0])
    cfg = PairConfig(rounds=5, streams=2, threshold=0.8, max_new_tokens=2)
    out = PAIR(cfg, attacker=attacker, score_fn=lambda b, g: next(scores)).run(llama, tok, behaviors[:1])[0]
    assert out.extra["rounds_run"] == 2 and out.extra["success"] and out.extra["queries"] == 4
    assert len(attacker.calls) == 4 and len(out.generations) == 4
    assert out.extra["scores"] == [0.1, 0.2, 0.9, 0.0]
    assert out.prompt == out.extra["best_prompt"] == "attempt 3" and out.extra["best_score"] == 0.9
    # The attacker's system prompt names the behaviour; round 2 shows the target's reply and score.
    assert behaviors[0].request in attacker.calls[0][0]["content"]
    assert "SCORE: 0.10" in attacker.calls[2][-1]["content"]
    assert out.budget == budget_of(cfg)


def test_pair_runs_all_rounds_when_the_score_never_passes(llama, tok, behaviors):
    attacker = FakeAttacker()
    cfg = PairConfig(rounds=3, streams=1, return_all=False, keep_last_n=1, max_new_tokens=2)
    outs = PAIR(cfg, attacker=attacker, score_fn=lambda b, g: 0.0).run(llama, tok, behaviors)
    assert [o.extra["rounds_run"] for o in outs] == [3, 3] and not outs[0].extra["success"]
    assert len(attacker.calls) == 6 and all(len(o.generations) == 1 for o in outs)
    # keep_last_n=1: system + one past round (2 turns) + the current message.
    assert max(len(m) for m in attacker.calls) == 4
    assert outs[1].extra["attacker"] == "FakeAttacker"


def test_pair_needs_a_score_function(llama, tok, behaviors):
    with pytest.raises(ValueError, match="score_fn"):
        PAIR(PairConfig(), attacker=FakeAttacker()).run(llama, tok, behaviors)


def test_parse_attacker_reply():
    assert parse_attacker_reply('{"improvement": "x", "prompt": "P1"}') == "P1"
    assert parse_attacker_reply('blah {"improvement": "x", "prompt": "P \\"2\\"') == 'P "2"'
    assert parse_attacker_reply("just a prompt") == "just a prompt"


def test_local_attacker_is_seeded(llama, tok):
    messages = [{"role": "system", "content": "attack"}, {"role": "user", "content": "go"}]
    a = LocalAttacker(llama, tok, max_new_tokens=4, seed=3)(messages)
    b = LocalAttacker(llama, tok, max_new_tokens=4, seed=3)(messages)
    assert a == b and a.startswith('{"improvement": "')
