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
    with TestClient(captured["app"], base_url="http://127.0.0.1:8123") as client:  # the Host it is bound to
        assert [m["id"] for m in client.get("/v1/models", headers={"Authorization": "Bearer from-env"}
                                            ).json()["data"]] == ["run", "run-baseline"]
        assert_error(client.post("/v1/chat/completions", json={"messages": HUMAN}), 401)
        assert_error(client.post("/v1/chat/completions", json={"messages": HUMAN, "max_tokens": 17},
                                 headers={"Authorization": "Bearer from-env"}), param="max_tokens")


def test_the_new_limits_are_options_with_their_defaults_in_the_help(capsys):
    args = make_parser().parse_args(["serve", "--model", "m"])
    assert (args.max_total_tokens, args.max_queue, args.request_timeout) == (4096, 128, 120.0)
    assert args.allowed_hosts == "" and args.allow_no_key is False
    with pytest.raises(SystemExit):
        make_parser().parse_args(["serve", "--help"])
    options = " ".join(capsys.readouterr().out.split()).split("options:", 1)[1]
    for option, default in (("--max-total-tokens", "4096"), ("--max-queue", "128"), ("--request-timeout", "120"),
                            ("--max-tokens-limit", "1024"), ("--max-input-tokens", "4096")):
        help_text = options.split(option + " ", 1)[1].split(" --", 1)[0]
        assert help_text.endswith(f"(default: {default})"), (option, help_text)


def test_a_public_address_without_a_key_is_refused(monkeypatch, capsys):
    monkeypatch.delenv("CB_TEST_KEY", raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        assert main(["serve", "--model", "m", "--host", host]) == 2  # before loading any model
        err = capsys.readouterr().err
        assert f"--host {host}" in err and "--api-key-env" in err and "--allow-no-key" in err


def test_allow_no_key_warns_and_the_host_check_follows_the_bind(monkeypatch, checkpoint, capsys):
    import uvicorn
    from fastapi.testclient import TestClient

    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    assert main(["serve", "--model", str(checkpoint), "--host", "0.0.0.0", "--allow-no-key", "--device", "cpu",
                 "--allowed-hosts", "models.lan,*.corp.example"]) == 0
    assert "WARNING" in capsys.readouterr().err and captured["host"] == "0.0.0.0"
    for base, status in (("http://10.1.2.3:8000", 200), ("http://localhost:8000", 200), ("http://models.lan", 200),
                         ("http://gpu.corp.example", 200), ("http://attacker.example", 400)):
        with TestClient(captured["app"], base_url=base) as client:
            assert client.get("/health").status_code == status, base
