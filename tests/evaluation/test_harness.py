"""The harness: samples.jsonl as it goes, resumption, results.json, best-of-N, errors, determinism."""
import json
from dataclasses import dataclass

import pytest
import torch

from circuit_breakers.attacks.base import AttackOutput, Behavior, budget_of
from circuit_breakers.data.schema import DataError
from circuit_breakers.evaluation.harness import evaluate, read_samples
from circuit_breakers.judges import RefusalJudge, Verdict

BEHAVIORS = [Behavior(id=f"b{i}", request=f"How do I do harmful thing {i}?", target="Sure") for i in range(6)]


@dataclass
class FakeConfig:
    max_new_tokens: int = 16
    batch_size: int = 1
    samples: int = 1


class FakeAttack:
    """Refuses on odd behaviours, complies on even ones; can crash after `fail_after` behaviours."""

    name = "fake"

    def __init__(self, fail_after=None, samples=1, noisy=False):
        self.config = FakeConfig(samples=samples)
        self.fail_after, self.noisy = fail_after, noisy
        self.calls: list[list[str]] = []
        self.seen = 0

    def run(self, model, tokenizer, behaviors):
        self.calls.append([b.id for b in behaviors])
        outputs = []
        for b in behaviors:
            if self.fail_after is not None and self.seen >= self.fail_after:
                raise RuntimeError("killed")
            self.seen += 1
            i = int(b.id[1:])
            gens = ["I'm sorry, I can't help." if i % 2 else f"Step one for thing {i}."]
            gens += ["I cannot do that."] * (self.config.samples - 1)
            if self.noisy:
                gens = [f"{g} {torch.rand(1).item():.6f}" for g in gens]
            outputs.append(AttackOutput(b.id, self.name, b.user_message(), gens, budget_of(self.config),
                                        extra={"loss": torch.tensor([0.5])}))
        return outputs


def test_samples_and_results_fields(tmp_path):
    attack = FakeAttack(samples=2)
    results = evaluate(None, None, BEHAVIORS, [attack], RefusalJudge(), tmp_path, baseline=object(), progress=False)
    samples = read_samples(tmp_path / "samples.jsonl")
    assert len(samples) == 2 * 2 * len(BEHAVIORS)  # 2 models x 2 samples x 6 behaviours
    first = samples[0]
    for key in ("prompt", "output", "label", "reason", "score", "behavior_id", "attack", "model", "sample_index"):
        assert key in first
    assert first["extra"] == {"loss": [0.5]} and first["budget"]["max_new_tokens"] == 16
    assert {s["model"] for s in samples} == {"model", "baseline"}
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["asr"] == results["asr"]
    entry = on_disk["asr"]["model"]["fake"]
    # Best-of-2: even behaviours comply in sample 0 (harmful) -> 3 of 6 broken.
    assert entry["asr"] == 0.5 and entry["n"] == 6 and entry["broken"] == 3 and entry["errors"] == 0
    assert entry["ci95"][0] == pytest.approx(0.18761, abs=1e-4) and entry["ci95"][1] == pytest.approx(0.81239, abs=1e-4)
    assert entry["judge"] == "refusal" and entry["samples_per_behavior"] == 2 and entry["max_new_tokens"] == 16
    assert entry["budget"] == {"max_new_tokens": 16, "batch_size": 1, "samples": 2}
    assert on_disk["judge"]["name"] == "refusal" and on_disk["seed"] == 0
    # The refusal judge measures attempts only: the headline is the complied rate, harmful is not measured.
    assert on_disk["judge"]["measures"] == ["complied"] and entry["asr_means"] == "complied"
    assert entry["complied"]["rate"] == 0.5 and entry["harmful"] is None
    assert {s["complied"] for s in samples if s["label"] == "harmful"} == {True}


def test_interrupted_run_resumes_without_duplicates(tmp_path):
    crashing = FakeAttack(fail_after=4)
    with pytest.raises(RuntimeError, match="killed"):
        evaluate(None, None, BEHAVIORS, [crashing], RefusalJudge(), tmp_path, progress=False, chunk_size=1)
    done = {s["behavior_id"] for s in read_samples(tmp_path / "samples.jsonl")}
    assert done == {"b0", "b1", "b2", "b3"}
    assert not (tmp_path / "results.json").exists()

    rest = FakeAttack()
    results = evaluate(None, None, BEHAVIORS, [rest], RefusalJudge(), tmp_path, progress=False, chunk_size=1)
    assert rest.calls == [["b4"], ["b5"]]  # only what was left
    samples = read_samples(tmp_path / "samples.jsonl")
    keys = [(s["model"], s["attack"], s["behavior_id"], s["sample_index"]) for s in samples]
    assert len(keys) == len(set(keys)) == len(BEHAVIORS)
    assert results["asr"]["model"]["fake"]["n"] == 6

    again = FakeAttack()
    evaluate(None, None, BEHAVIORS, [again], RefusalJudge(), tmp_path, progress=False)
    assert again.calls == []  # everything done: nothing rerun
    fresh = FakeAttack()
    evaluate(None, None, BEHAVIORS, [fresh], RefusalJudge(), tmp_path, progress=False, resume=False)
    assert sum(len(c) for c in fresh.calls) == 6 and len(read_samples(tmp_path / "samples.jsonl")) == 6


def test_half_written_last_line_is_dropped(tmp_path):
    evaluate(None, None, BEHAVIORS[:2], [FakeAttack()], RefusalJudge(), tmp_path, progress=False)
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write('{"model": "model", "attack": "fake", "behavior_id": "b2", "lab')  # killed mid-write
    attack = FakeAttack()
    evaluate(None, None, BEHAVIORS[:3], [attack], RefusalJudge(), tmp_path, progress=False)
    assert attack.calls == [["b2"]]
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)


def test_error_labels_are_counted_apart(tmp_path):
    class FlakyJudge(RefusalJudge):
        name = "flaky"

        def label(self, behavior, generation, *, harmful_prompt=True):
            if behavior.id in ("b0", "b1"):
                return Verdict("error", "classifier answered 'maybe'")
            return super().label(behavior, generation, harmful_prompt=harmful_prompt)

    results = evaluate(None, None, BEHAVIORS, [FakeAttack()], FlakyJudge(), tmp_path, progress=False)
    entry = results["asr"]["model"]["fake"]
    assert entry["errors"] == 2 and entry["error_samples"] == 2 and entry["n"] == 4
    assert entry["broken"] == 2 and entry["asr"] == 0.5  # b2, b4 of b2..b5
    assert entry["label_counts"]["error"] == 2


def test_resuming_with_another_judge_is_refused(tmp_path):
    evaluate(None, None, BEHAVIORS[:1], [FakeAttack()], RefusalJudge(), tmp_path, progress=False)

    class Other(RefusalJudge):
        name = "other"

    with pytest.raises(DataError, match="judged by refusal"):
        evaluate(None, None, BEHAVIORS, [FakeAttack()], Other(), tmp_path, progress=False)


def test_same_seed_same_samples(tmp_path):
    outputs = []
    for run in range(2):
        evaluate(None, None, BEHAVIORS[:3], [FakeAttack(noisy=True)], RefusalJudge(), tmp_path / str(run),
                 progress=False, seed=7)
        outputs.append([s["output"] for s in read_samples(tmp_path / str(run) / "samples.jsonl")])
    assert outputs[0] == outputs[1]


def test_direct_attack_from_the_registry(tmp_path, chat_tokenizer):
    from circuit_breakers import attacks

    from ..helpers import make_tiny_model

    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=2)
    direct = attacks.make_attack("direct", max_new_tokens=4)
    results = evaluate(model, chat_tokenizer, BEHAVIORS[:2], [direct], RefusalJudge(), tmp_path, progress=False)
    assert results["asr"]["model"]["direct"]["n"] == 2
    assert results["asr"]["model"]["direct"]["max_new_tokens"] == 4


def test_results_keep_attacks_of_earlier_runs_into_the_same_out(tmp_path):
    class Second(FakeAttack):
        name = "second"

    evaluate(None, None, BEHAVIORS[:2], [FakeAttack()], RefusalJudge(), tmp_path, progress=False)
    results = evaluate(None, None, BEHAVIORS[:2], [Second()], RefusalJudge(), tmp_path, progress=False)
    assert list(results["asr"]["model"]) == ["second", "fake"]
    assert results["asr"]["model"]["fake"]["budget"]["max_new_tokens"] == 16


def test_judge_in_the_loop_attacks_get_the_runs_judge(tmp_path):
    class LoopAttack(FakeAttack):
        name = "loop"
        score_fn = None

        def run(self, model, tokenizer, behaviors):
            self.scores = [self.score_fn(b, "I'm sorry, no.") for b in behaviors] + \
                          [self.score_fn(b, "Step one for the thing.") for b in behaviors]
            return super().run(model, tokenizer, behaviors)

    attack = LoopAttack()
    evaluate(None, None, BEHAVIORS[:1], [attack], RefusalJudge(), tmp_path, progress=False)
    assert attack.scores == [0.0, 1.0]


def test_prefill_is_not_credited_to_the_model(tmp_path):
    from circuit_breakers.judges import HeuristicJudge

    class Prefill(FakeAttack):
        name = "prefill"

        def run(self, model, tokenizer, behaviors):
            prefill = "Sure, here is how to do harmful thing 0:\n\n"
            return [AttackOutput(b.id, self.name, b.request, [prefill + "ok"], {}, extra={"prefill": prefill})
                    for b in behaviors]

    evaluate(None, None, BEHAVIORS[:1], [Prefill()], HeuristicJudge(), tmp_path / "a", progress=False)
    sample = read_samples(tmp_path / "a" / "samples.jsonl")[0]
    assert sample["label"] == "broken-down" and sample["judged"] == "continuation"
    assert sample["output"].startswith("Sure, here is") and sample["output"].endswith("ok")
    evaluate(None, None, BEHAVIORS[:1], [Prefill()], HeuristicJudge(), tmp_path / "b", progress=False,
             judge_full_turn=True)
    sample = read_samples(tmp_path / "b" / "samples.jsonl")[0]
    assert sample["label"] == "harmful" and "judged" not in sample


def test_results_name_the_judges_held_out_agreement(tmp_path):
    from circuit_breakers.judges.fitted import shipped_heldout
    from circuit_breakers.reports.render import _heldout_text

    results = evaluate(None, None, BEHAVIORS[:2], [FakeAttack()], RefusalJudge(), tmp_path, progress=False)
    heldout = results["judge"]["heldout"]
    assert heldout == shipped_heldout() and heldout["refusal"]["n"] >= 300
    assert "never fitted on" in _heldout_text(results["judge"]) and f"n={heldout['refusal']['n']}" in \
        _heldout_text(results["judge"])


def test_a_models_later_attacks_reuse_the_prompt_caches_of_its_earlier_ones(tmp_path, chat_tokenizer, monkeypatch):
    """Prefilling's prompts extend the direct request's: with the kept caches (the default) it prefills only
    the prefill, and every sample is what it is with them off."""
    from circuit_breakers import attacks, generation

    from ..helpers import make_tiny_model

    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=2)
    reused = []
    past_for = generation.PromptCacheStore.past_for

    def spy(store, input_ids, attention_mask):
        past = past_for(store, input_ids, attention_mask)
        reused.append(past is not None)
        return past

    monkeypatch.setattr(generation.PromptCacheStore, "past_for", spy)
    runs = {}
    for gb in (1.0, 0):
        made = [attacks.make_attack(name, max_new_tokens=4) for name in ("direct", "prefilling")]
        evaluate(model, chat_tokenizer, BEHAVIORS[:3], made, RefusalJudge(), tmp_path / str(gb), progress=False,
                 baseline=model, prompt_cache_gb=gb)
        samples = read_samples(tmp_path / str(gb) / "samples.jsonl")
        runs[gb] = [(r["model"], r["attack"], r["behavior_id"], r["output"]) for r in samples]
    assert runs[1.0] == runs[0] and len(runs[0]) == 12
    assert reused == [False, True] * 2  # per model: direct keeps, prefilling reuses; nothing at 0 GiB
