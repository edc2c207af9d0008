import csv
import json

import pytest

from circuit_breakers.data import DataError, Example, load_examples, read_jsonl, write_jsonl
from circuit_breakers.data.schema import example_from_record

RECORDS = [
    {"request": "How do I pick a lock?", "response": "Sure, first ...", "category": "crime", "id": "a1"},
    {"request": "What is 2+2?", "response": "4", "source": "orig.jsonl:9"},
]


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_loads_fields_and_sets_source(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in RECORDS[:1]] + ["", json.dumps(RECORDS[1])])
    first, second = load_examples(path)
    assert first == Example(response="Sure, first ...", request="How do I pick a lock?",
                            category="crime", id="a1", source=f"{path}:1")
    assert first.conversation() == [{"role": "user", "content": "How do I pick a lock?"}]
    # A record's own provenance wins; the blank line still counts for line numbers.
    assert second.source == "orig.jsonl:9"
    assert load_examples(path, limit=1) == [first]


def test_reference_field_names(tmp_path):
    record = {"prompt": "p", "output": "uncensored", "llama3_output": "llama", "category": "c",
              "extra": [1, 2]}
    path = write_lines(tmp_path / "ref.jsonl", [json.dumps(record)])
    (ex,) = load_examples(path)
    assert (ex.request, ex.response, ex.category) == ("p", "uncensored", "c")
    (ex,) = load_examples(path, response_field="llama3_output")
    assert ex.response == "llama"
    assert example_from_record({"instruction": "i", "output": "o"}, "x").request == "i"


def test_messages_and_request_only(tmp_path):
    messages = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}]
    ex = example_from_record({"messages": messages, "response": "Hello"}, "x")
    assert ex.conversation() == messages and ex.request is None
    assert ex.to_json() == {"messages": messages, "response": "Hello"}
    path = write_lines(tmp_path / "prompts.jsonl", [json.dumps({"prompt": "only a prompt"})])
    (ex,) = load_examples(path, require_response=False)
    assert (ex.request, ex.response) == ("only a prompt", "")


def test_json_list_and_dict_with_data_key(tmp_path):
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(RECORDS))
    as_dict = tmp_path / "dict.json"
    as_dict.write_text(json.dumps({"version": "1", "data": RECORDS}))
    assert [e.request for e in load_examples(as_list)] == [r["request"] for r in RECORDS]
    assert load_examples(as_dict)[0].source == f"{as_dict}:1"
    assert load_examples(as_dict)[1:] == load_examples(as_list)[1:]


def test_csv_with_messages_column(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["request", "response", "messages", "category"])
        writer.writeheader()
        writer.writerow({"request": "q1", "response": "multi\nline answer", "category": "c"})
        writer.writerow({"response": "r2",
                         "messages": json.dumps([{"role": "user", "content": "q2"}])})
    first, second = load_examples(path)
    assert (first.request, first.response, first.category) == ("q1", "multi\nline answer", "c")
    assert second.messages == ({"role": "user", "content": "q2"},) and second.category is None
    assert second.source == f"{path}:4"  # the quoted line break makes row 1 span lines 2-3


def test_datasets_save_to_disk_dataset_and_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(RECORDS)
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    loaded = load_examples(tmp_path / "ds")
    assert [e.response for e in loaded] == ["Sure, first ...", "4"]
    assert loaded[0].category == "crime" and loaded[1].category is None  # None fills gaps
    assert [e.request for e in load_examples(tmp_path / "dd", split="test")] == ["What is 2+2?"]
    assert len(load_examples(tmp_path / "dd", limit=1)) == 1
    with pytest.raises(DataError, match='split "dev" not found; available: train, test'):
        load_examples(tmp_path / "dd", split="dev")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one written by datasets save_to_disk"):
        load_examples(tmp_path / "plain")


def test_hub_spec_success_and_offline_failure(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(RECORDS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert len(load_examples("hf:org/name:validation")) == 2
    assert load_examples("hf:org/name")[0].source == "hf:org/name:train:1"
    assert calls == [("org/name", "validation"), ("org/name", "train")]

    def offline(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="hub may be unreachable.*pass a local .jsonl"):
        load_examples("hf:org/name")


@pytest.mark.parametrize("content, message", [
    ("", r"no records"),
    ("\n\n", r"no records"),
    ('{"request": "a", "response": "b"}\n{"request": "a",\n', r"bad\.jsonl line 2: invalid JSON"),
    ('[1, 2]\n', r"bad\.jsonl line 1: expected a JSON object, got list"),
    ('{"response": "b"}\n', r'bad\.jsonl line 1: field "request": missing'),
    ('{"request": "a"}\n', r'line 1: field "response": missing'),
    ('{"request": "a", "response": 3}\n', r'line 1: field "response": expected a non-empty string, got int'),
    ('{"request": "a", "response": "  "}\n', r'field "response": expected a non-empty string'),
    ('{"request": ["a"], "response": "b"}\n', r'field "request": expected a string, got list'),
    ('{"prompt": "a", "output": "b", "category": 5}\n', r'field "category": expected a string, got int'),
    ('{"messages": [{"role": "bot", "content": "x"}], "response": "b"}\n',
     r'field "messages\[0\]\.role": expected one of system, user, assistant'),
    ('{"messages": "hi", "response": "b"}\n', r'field "messages": expected a non-empty list'),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        load_examples(path)
    assert "bad.jsonl" in str(info.value)


def test_llama3_output_is_required_when_asked_for(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "p", "output": "o"})])
    with pytest.raises(DataError, match='line 1: field "llama3_output": missing'):
        load_examples(path, response_field="llama3_output")


def test_missing_file_unsupported_extension_and_read_jsonl(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match=r'unsupported file type "\.txt"; supported: "\.jsonl", "\.json", "\.csv"'):
        load_examples(tmp_path / "d.txt")
    empty_json = tmp_path / "e.json"
    empty_json.write_text("[]")
    with pytest.raises(DataError, match=r"e\.json: no records"):
        load_examples(empty_json)
    bad_json = tmp_path / "b.json"
    bad_json.write_text('[\n{"request": "a",}\n]')
    with pytest.raises(DataError, match=r"b\.json line 2: invalid JSON"):
        load_examples(bad_json)
    raw = write_lines(tmp_path / "raw.jsonl", ['{"anything": 1}'])
    assert read_jsonl(raw) == [{"anything": 1}]


def test_write_jsonl_is_atomic_and_round_trips(tmp_path):
    examples = [
        Example(response="r1 \u2028 with a line separator", request="q1", category="c", id="1"),
        Example(response="r2", messages=({"role": "user", "content": "q2"},), source="s:2"),
    ]
    path = tmp_path / "new" / "dir" / "out.jsonl"
    write_jsonl(path, examples + [{"request": "q3", "response": "r3"}])
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]  # no temp file left
    loaded = load_examples(path)
    assert loaded[0] == Example(response=examples[0].response, request="q1", category="c", id="1",
                                source=f"{path}:1")
    assert loaded[1] == examples[1]
    assert loaded[2].request == "q3"

    # A failure while writing leaves the old file untouched and no temp file behind.
    def broken():
        yield Example(response="x", request="y")
        raise RuntimeError("generator failed")

    with pytest.raises(RuntimeError):
        write_jsonl(path, broken())
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]
    assert len(read_jsonl(path)) == 3
