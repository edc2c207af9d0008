"""The server's generation loop and its batcher, without HTTP."""
import asyncio
import time

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


LONG = [{"role": "user", "content": "Explain the water cycle in three short sentences. " * 6}]  # ~70 tokens


def run_to_the_end(run):
    results, steps = {}, 0
    while not run.done:
        results.update(run.step())
        steps += 1
    return [results[i] for i in range(len(run.requests))], steps


def test_a_long_prompt_is_prefilled_in_slices_with_the_same_answer(model, tokenizer):
    from circuit_breakers.serving.engine import BatchGeneration
    from circuit_breakers.serving.monitoring import make_monitor

    from ..helpers import probe_for

    prompts = [LONG, PROMPTS[1]]
    expected = generate(model, tokenizer, prompts, max_new_tokens=6)
    whole, whole_steps = run_to_the_end(BatchGeneration(model, tokenizer, [GenRequest(ids(tokenizer, p), 6)
                                                                          for p in prompts]))
    sliced, sliced_steps = run_to_the_end(BatchGeneration(model, tokenizer, [GenRequest(ids(tokenizer, p), 6)
                                                                            for p in prompts], prefill_tokens=32))
    assert [r.text for r in whole] == [r.text for r in sliced] == expected
    assert sliced_steps >= whole_steps + 2  # 32 columns a step: the ~70-token prompt took three
    # the probe scores the generated tokens alike, however the prompt was fed
    monitor = make_monitor(model, probe_for(model))
    a, _ = run_to_the_end(BatchGeneration(model, tokenizer, [GenRequest(ids(tokenizer, LONG), 6)], monitor=monitor))
    b, _ = run_to_the_end(BatchGeneration(model, tokenizer, [GenRequest(ids(tokenizer, LONG), 6)], monitor=monitor,
                                          prefill_tokens=32))
    assert a[0].text == b[0].text and a[0].token_scores == pytest.approx(b[0].token_scores, abs=1e-5)


def test_a_finished_row_is_reported_before_its_batch_ends(model, tokenizer):
    from circuit_breakers.serving.engine import BatchGeneration

    run = BatchGeneration(model, tokenizer, [GenRequest(ids(tokenizer, PROMPTS[0]), 2),
                                             GenRequest(ids(tokenizer, PROMPTS[1]), 20)])
    first = {}
    while 0 not in first:
        first.update(run.step())
    assert not run.done and 1 not in first and first[0].completion_tokens == 2
    assert run.remaining == 20 - 2  # the long row: its tokens still to generate


class FakeRun:
    """A batch of jobs whose payload is their number of steps; records the order it ran in."""

    def __init__(self, jobs, log):
        self.jobs, self.log, self.left = jobs, log, [job.payload for job in jobs]
        self.done = False

    @property
    def remaining(self):
        live = [n for n in self.left if n > 0]
        return sum(live) / len(live) if live else 0

    def step(self):
        time.sleep(0.005)  # a step takes time, in its thread
        self.log.append(tuple(job.payload for job in self.jobs))
        finished = {}
        for i, n in enumerate(self.left):
            if n > 0:
                self.left[i] = n - 1
                if n == 1:
                    finished[i] = f"done {self.jobs[i].payload}"
        self.done = not any(self.left)
        return finished


def test_batcher_runs_short_batches_before_a_long_one_it_started():
    log = []
    batcher = Batcher(lambda jobs: FakeRun(jobs, log), batch_size=4, batch_wait_ms=0)

    async def main():
        long = asyncio.ensure_future(batcher.submit(Job("long", 50, cost=50)))
        await asyncio.sleep(0.05)  # the long batch has started
        shorts = await asyncio.gather(*(batcher.submit(Job("short", 3, cost=3)) for _ in range(4)))
        long_steps_by_then = sum(1 for entry in log if entry == (50,))
        result = await long
        await batcher.close()
        return shorts, long_steps_by_then, result

    shorts, long_steps_by_then, result = asyncio.run(main())
    assert shorts == ["done 3"] * 4 and result == "done 50"
    assert long_steps_by_then < 50  # the short ones did not wait for it
    short_steps = [i for i, entry in enumerate(log) if entry == (3, 3, 3, 3)]
    assert short_steps == list(range(short_steps[0], short_steps[0] + 3))  # three steps in a row


def test_batcher_bounds_the_waiting_line_and_retries_a_failed_batch_alone():
    from circuit_breakers.serving.batcher import QueueFull

    seen = []

    def run(jobs):
        seen.append([job.payload for job in jobs])
        if "bad" in seen[-1]:
            raise RuntimeError("bad batch")
        return [job.payload.upper() for job in jobs]

    batcher = Batcher(run, batch_size=4, batch_wait_ms=50, max_queue=3)

    async def main():
        jobs = [Job("k", p) for p in ("a", "bad", "b")]
        for job in jobs:
            batcher.enqueue(job)
        with pytest.raises(QueueFull) as full:
            batcher.enqueue(Job("k", "one too many"))
        results = await asyncio.gather(*(batcher.wait(job) for job in jobs), return_exceptions=True)
        await batcher.close()
        return full.value, results

    full, results = asyncio.run(main())
    assert full.retry_after >= 1 and batcher.stats.rejected == 1
    assert results[0] == "A" and results[2] == "B" and isinstance(results[1], RuntimeError)
    assert seen == [["a", "bad", "b"], ["a"], ["bad"], ["b"]] and batcher.stats.retried == 3
