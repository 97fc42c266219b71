"""ServerConfig.from_env (the architecture's configuration table), `sith serve` defaults, and stubs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sith.cli.serve import LOCAL_ADDRESS, _environment
from sith.engine.errors import InvalidInput
from sith_server.auth import read_tokens
from sith_server.config import ServerConfig

REPO = Path(__file__).resolve().parent.parent


def test_defaults_match_the_architecture_table():
    c = ServerConfig.from_env({})
    assert (c.grpc_address, c.metrics_port, c.redis_url, c.auth_tokens_file, c.auth_disabled) == (
        "0.0.0.0:50051", 9464, None, None, False)
    assert (c.tls_cert, c.tls_key, c.workers, c.models, c.cache_ttl_s) == (None, None, 1, (), 604800)
    assert c.device in ("cpu", "cuda:0")
    assert c.data_dir == Path("~/.cache/sith").expanduser()


def test_every_variable_is_read(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    c = ServerConfig.from_env({
        "SITH_GRPC_ADDRESS": "127.0.0.1:6000", "SITH_METRICS_PORT": "0", "SITH_REDIS_URL": "redis://r:6379/1",
        "SITH_AUTH_TOKENS_FILE": str(tmp_path / "t"), "SITH_AUTH_DISABLED": "1", "SITH_TLS_CERT": str(cert),
        "SITH_TLS_KEY": str(key), "SITH_DEVICE": "cuda:1", "SITH_WORKERS": "0",
        "SITH_MODELS": "ViT-B-32/openai, /m/folder ,", "SITH_CACHE_TTL_S": "60", "SITH_DATA_DIR": str(tmp_path)})
    assert c == ServerConfig("127.0.0.1:6000", 0, "redis://r:6379/1", tmp_path / "t", True, cert, key, "cuda:1", 0,
                             ("ViT-B-32/openai", "/m/folder"), 60, tmp_path)


@pytest.mark.parametrize("env, field", [
    ({"SITH_WORKERS": "two"}, "SITH_WORKERS"),
    ({"SITH_METRICS_PORT": "-1"}, "SITH_METRICS_PORT"),
    ({"SITH_CACHE_TTL_S": "0"}, "SITH_CACHE_TTL_S"),
    ({"SITH_TLS_CERT": "/c.pem"}, "SITH_TLS_KEY"),
])
def test_bad_values_name_the_variable(env, field):
    with pytest.raises(InvalidInput) as err:
        ServerConfig.from_env(env)
    assert err.value.field == field


def test_auth_is_on_unless_disabled(tmp_path):
    with pytest.raises(InvalidInput, match="SITH_AUTH_TOKENS_FILE"):
        ServerConfig.from_env({"SITH_REDIS_URL": "redis://x"}).check()
    ServerConfig.from_env({"SITH_AUTH_DISABLED": "1"}).check()
    tokens = tmp_path / "tokens"
    tokens.write_text("a t1\n# comment\n\nb t2  # trailing\n")
    ServerConfig.from_env({"SITH_AUTH_TOKENS_FILE": str(tokens)}).check()
    assert read_tokens(tokens) == {"a": "t1", "b": "t2"}
    tokens.write_text("only-a-token\n")
    with pytest.raises(InvalidInput, match="line 1"):
        read_tokens(tokens)


def test_serve_embedded_default_disables_auth_on_localhost_only(monkeypatch):
    for name in ("SITH_REDIS_URL", "SITH_AUTH_TOKENS_FILE", "SITH_GRPC_ADDRESS", "SITH_AUTH_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    env, embedded = _environment(None, None, (), None)
    assert embedded and env["SITH_AUTH_DISABLED"] == "1" and env["SITH_GRPC_ADDRESS"] == LOCAL_ADDRESS
    monkeypatch.setenv("SITH_REDIS_URL", "redis://redis:6379/0")
    env, embedded = _environment("0.0.0.0:1", 2, ("a", "b"), 0)
    assert not embedded and "SITH_AUTH_DISABLED" not in env
    assert (env["SITH_GRPC_ADDRESS"], env["SITH_WORKERS"], env["SITH_MODELS"]) == ("0.0.0.0:1", "2", "a,b")
    assert "SITH_VOCABULARY" not in env  # real models: the English vocabulary


def test_vocabulary_setting(monkeypatch, tmp_path):
    from sith_server.vocabulary import from_setting

    monkeypatch.delenv("SITH_VOCABULARY", raising=False)
    monkeypatch.delenv("SITH_MODELS", raising=False)
    env, _ = _environment(None, None, (), None)
    assert env["SITH_VOCABULARY"] == "testbed"  # the embedded testbed model knows only its world's words
    assert ServerConfig.from_env({}).vocabulary == "default"
    testbed = from_setting(ServerConfig.from_env({"SITH_VOCABULARY": "testbed"}).vocabulary)
    assert testbed.check(["red", "circle", "water"], "concepts") == ["red", "circle", "water"]
    assert "dictionary" in testbed.job_fields()  # jobs carry the list: workers explain over the same words
    words = tmp_path / "words.txt"
    words.write_text("dog\ncat\n\ndog\n")
    assert from_setting(ServerConfig.from_env({"SITH_VOCABULARY": str(words)}).vocabulary).custom == ["dog", "cat"]
    with pytest.raises(InvalidInput) as err:
        ServerConfig.from_env({"SITH_VOCABULARY": str(tmp_path / "missing.txt")})
    assert err.value.field == "SITH_VOCABULARY" and "no such file" in err.value.reason
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(InvalidInput):
        from_setting(str(tmp_path / "empty.txt"))


def test_committed_stubs_are_up_to_date():
    spec = importlib.util.spec_from_file_location("proto_generate", REPO / "proto" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert generate.stale() == [], "run: python proto/generate.py"


def test_stubs_import_package_absolute():
    text = (REPO / "client" / "sith_client" / "v1" / "sith_pb2_grpc.py").read_text()
    assert "from sith_client.v1 import sith_pb2" in text
