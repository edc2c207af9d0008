"""The server's generation loop and its batcher, without HTTP."""
import asyncio

import pytest

from circuit_breakers.generation import chat_prompt, generate
from circuit_breakers.serving.batcher import Batcher, Job
from circuit_breakers.serving.engine import GenRequest, StopTracker, generate_rows

PROMPTS = [[{"role": "user", "content": "How do I bake bread?"}], [{"role": "user", "content": "Hi"}],
           [{"role": "user", "content": ""}]]


def ids(tokenizer, messages):
    return tokenizer(chat_prompt(tokenizer, messages), add_special_tokens=False).input_ids


def test_stop_tracker_trims_and_holds_back_possible_stops():
    tracker = StopTracker(["STOP", "#"])
    assert tracker.update("Hello S") == "Hello "  # "S" may start "STOP"
    assert tracker.update("Hello ST") == ""
    assert tracker.update("Hello STa") == "STa"  # it did not
    assert tracker.update("Hello STa x#y") == " x" and tracker.stopped
    assert tracker.text == "Hello STa x" and tracker.flush() == ""
    partial = StopTracker()
    assert partial.update("ab\ufffd") == "ab"  # an unfinished character waits
    assert partial.update("abc") == "c"
    assert StopTracker(["", None or ""]).stop == ()


def test_greedy_rows_match_generate_batched_or_not(model, tokenizer):
    expected = generate(model, tokenizer, PROMPTS, max_new_tokens=9)
    batched = generate_rows(model, tokenizer, [GenRequest(ids(tokenizer, p), 9) for p in PROMPTS])
    assert [r.text for r in batched] == expected
    single = [generate_rows(model, tokenizer, [GenRequest(ids(tokenizer, p), 9)])[0].text for p in PROMPTS]
    assert single == expected
    assert all(r.completion_tokens == 9 and r.finish_reason == "length" for r in batched)


def test_rows_keep_their_own_settings(model, tokenizer):
    full = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=12)[0]
    stop = full[2:4]
    deltas = []
    rows = generate_rows(model, tokenizer, [
        GenRequest(ids(tokenizer, PROMPTS[0]), 12, stop=(stop,), on_delta=lambda d, s: deltas.append(d)),
        GenRequest(ids(tokenizer, PROMPTS[0]), 3),
        GenRequest(ids(tokenizer, PROMPTS[1]), 12, temperature=1.0, seed=3),
    ])
    assert rows[0].text == full[:full.index(stop)] and rows[0].finish_reason == "stop"
    assert "".join(deltas) == rows[0].text
    assert rows[1].completion_tokens == 3 and full.startswith(rows[1].text)
    again = generate_rows(model, tokenizer, [GenRequest(ids(tokenizer, PROMPTS[1]), 12, temperature=1.0, seed=3)])
    assert again[0].text == rows[2].text  # a seeded row does not depend on its batch


def test_a_cancelled_row_stops(model, tokenizer):
    seen = []
    row = GenRequest(ids(tokenizer, PROMPTS[0]), 50, on_delta=lambda d, s: seen.append(d),
                     cancelled=lambda: len(seen) >= 2)
    other = GenRequest(ids(tokenizer, PROMPTS[1]), 5)
    results = generate_rows(model, tokenizer, [row, other])
    assert results[0].completion_tokens <= 3 and results[1].completion_tokens == 5


def test_batcher_groups_by_key_and_survives_errors():
    seen = []

    def run(jobs):
        seen.append([job.payload for job in jobs])
        if any(job.payload == "boom" for job in jobs):
            raise RuntimeError("boom")
        return [job.payload.upper() for job in jobs]

    batcher = Batcher(run, batch_size=3, batch_wait_ms=50)

    async def main():
        jobs = [Job("a", "x"), Job("b", "y"), Job("a", "z"), Job("a", "w"), Job("a", "v")]
        results = await asyncio.gather(*(batcher.submit(j) for j in jobs))
        failed = await asyncio.gather(batcher.submit(Job("c", "boom")), return_exceptions=True)
        after = await batcher.submit(Job("a", "ok"))
        await batcher.close()
        return results, failed, after

    results, failed, after = asyncio.run(main())
    assert results == ["X", "Y", "Z", "W", "V"]
    assert seen[0] == ["x", "z", "w"]  # same key, up to batch_size; "b" waits its turn
    assert seen[1] == ["y"] and seen[2] == ["v"]
    assert isinstance(failed[0], RuntimeError) and after == "OK"
    assert batcher.stats.batches == 5 and batcher.stats.largest == 3


def test_batcher_rejects_a_zero_batch_size():
    with pytest.raises(ValueError):
        Batcher(lambda jobs: jobs, batch_size=0)
