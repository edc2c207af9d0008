"""The `images` field: loading, path resolution against the data file, errors naming file, line and field."""
from __future__ import annotations

import base64
import json

import pytest

from circuit_breakers.data import ChatFormatter, DataError, Example, load_examples, write_jsonl

from ..helpers import write_test_image


def test_relative_image_paths_resolve_against_the_data_file(image_sets):
    examples = load_examples(image_sets[0])
    assert [len(e.images) for e in examples] == [1, 0, 1, 0, 1, 0]
    assert examples[0].images == (str(image_sets[0].parent / "images" / "0.png"),)


def test_a_missing_image_names_file_line_and_field(tmp_path):
    write_test_image(tmp_path / "there.png")
    data = tmp_path / "set.jsonl"
    data.write_text(json.dumps({"request": "a", "response": "b", "images": ["there.png"]}) + "\n"
                    + json.dumps({"request": "a", "response": "b", "images": ["there.png", "gone.png"]}) + "\n")
    with pytest.raises(DataError, match=rf'set.jsonl line 2: field "images\[1\]": {tmp_path}/gone.png: image file not found'):
        load_examples(data)


def test_images_in_json_csv_and_data_uris(tmp_path):
    png = write_test_image(tmp_path / "a.png").read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    (tmp_path / "set.json").write_text(json.dumps([{"request": "a", "response": "b", "images": [uri, "a.png"]}]))
    (example,) = load_examples(tmp_path / "set.json")
    assert example.images == (png, str(tmp_path / "a.png"))
    (tmp_path / "set.csv").write_text('request,response,images\na,b,a.png\nc,d,"[""a.png"", ""a.png""]"\n')
    assert [len(e.images) for e in load_examples(tmp_path / "set.csv")] == [1, 2]


@pytest.mark.parametrize("value, problem", [
    ([3], 'field "images\\[0\\]": expected an image path, a data: URI or bytes, got int'),
    (["data:image/png,abc"], 'field "images\\[0\\]": a data: URI that is not base64'),
    ([""], 'field "images\\[0\\]": expected an image path'),
])
def test_bad_image_values_are_errors(tmp_path, value, problem):
    data = tmp_path / "set.jsonl"
    data.write_text(json.dumps({"request": "a", "response": "b", "images": value}) + "\n")
    with pytest.raises(DataError, match=f"set.jsonl line 1: {problem}"):
        load_examples(data)


def test_images_round_trip_through_jsonl(tmp_path):
    png = write_test_image(tmp_path / "a.png").read_bytes()
    write_jsonl(tmp_path / "out.jsonl", [Example(response="b", request="a", images=(str(tmp_path / "a.png"), png))])
    (example,) = load_examples(tmp_path / "out.jsonl")
    assert example.images == (str(tmp_path / "a.png"), png)


def test_images_given_to_a_text_only_model_are_an_error(chat_tokenizer, image_sets):
    (example, *_) = load_examples(image_sets[0])
    with pytest.raises(DataError, match=r'harmful.jsonl:1: field "images": \'tiny-chatml-test\' is a text-only model'):
        ChatFormatter(chat_tokenizer, 64).format(example)
