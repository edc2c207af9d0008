"""`circuit-breakers serve`: the parser, the key from the environment, and the app it would run."""
import pytest

from circuit_breakers.cli import main, make_parser
from circuit_breakers.serving.cli import model_name_for

from ..helpers import HUMAN, assert_error, make_tiny_model


@pytest.fixture
def checkpoint(tmp_path, tokenizer):
    path = tmp_path / "run" / "model"
    make_tiny_model("llama", vocab_size=len(tokenizer), layers=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_parser_defaults_bind_to_loopback():
    args = make_parser().parse_args(["serve", "--model", "m"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.api_key_env is None
    assert args.max_tokens_limit == 1024 and args.batch_size == 8
    with pytest.raises(SystemExit):
        make_parser().parse_args(["serve", "--model", "m", "--api-key", "x"])  # no key on the command line


def test_model_name(checkpoint):
    assert model_name_for(str(checkpoint)) == "run"
    assert model_name_for("org/some-model") == "org/some-model"


def test_missing_key_variable_is_an_error(monkeypatch, capsys):
    monkeypatch.delenv("CB_TEST_KEY", raising=False)
    assert main(["serve", "--model", "m", "--api-key-env", "CB_TEST_KEY"]) == 2
    assert "CB_TEST_KEY" in capsys.readouterr().err
    # a key given where the variable's name belongs is refused without being echoed
    assert main(["serve", "--model", "m", "--api-key-env", "sk-9f/8+x=="]) == 2
    assert "sk-9f" not in capsys.readouterr().err


def test_serve_runs_uvicorn_with_the_app(monkeypatch, checkpoint, capsys):
    import uvicorn
    from fastapi.testclient import TestClient

    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    monkeypatch.setenv("CB_TEST_KEY", "from-env")
    code = main(["serve", "--model", str(checkpoint), "--baseline", str(checkpoint), "--api-key-env", "CB_TEST_KEY",
                 "--port", "8123", "--max-tokens-limit", "16", "--batch-size", "2", "--device", "cpu"])
    assert code == 0
    assert captured["host"] == "127.0.0.1" and captured["port"] == 8123
    assert "from-env" not in capsys.readouterr().err  # the key is never printed
    with TestClient(captured["app"]) as client:
        assert [m["id"] for m in client.get("/v1/models", headers={"Authorization": "Bearer from-env"}
                                            ).json()["data"]] == ["run", "run-baseline"]
        assert_error(client.post("/v1/chat/completions", json={"messages": HUMAN}), 401)
        assert_error(client.post("/v1/chat/completions", json={"messages": HUMAN, "max_tokens": 17},
                                 headers={"Authorization": "Bearer from-env"}), param="max_tokens")
