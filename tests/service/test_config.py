"""One configuration file plus PHENOLENS_ environment overrides."""

from __future__ import annotations

import pytest

from server.auth import ADMIN, ANONYMOUS, READ, TokenAuth, hash_token
from server.config import ConfigError, load_config
from server.errors import PermissionDenied, Unauthenticated


def test_yaml_file_then_environment_overrides(tmp_path):
    path = tmp_path / "phenolens.yaml"
    path.write_text("listen: 0.0.0.0:6000\nlimits:\n  max_top_k: 20\n  max_concurrent: 3\n"
                    "gallery:\n  path: galleries/g.sqlite\n")
    config = load_config(path, env={"PHENOLENS_LIMITS__MAX_TOP_K": "7",
                                    "PHENOLENS_DEVICE": "cpu",  # encoder.runtime's, ignored here
                                    "PHENOLENS_EXPLAIN__METHODS": "similarity,occlusion"})
    assert config.listen == "0.0.0.0:6000"
    assert config.limits.max_top_k == 7 and config.limits.max_concurrent == 3
    assert config.explain.methods == ("similarity", "occlusion")
    assert config.gallery.path == tmp_path / "galleries" / "g.sqlite"


def test_toml_file_is_read(tmp_path):
    path = tmp_path / "phenolens.toml"
    path.write_text('listen = "127.0.0.1:7000"\n[tls]\ncert = "s.pem"\nkey = "s.key"\n')
    config = load_config(path, env={})
    assert config.tls.enabled and config.tls.cert == tmp_path / "s.pem"


def test_unknown_key_is_an_error_that_names_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("limits:\n  max_topk: 3\n")
    with pytest.raises(ConfigError, match="max_topk"):
        load_config(path, env={})


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="limits.max_concurrent"):
        load_config(env={"PHENOLENS_LIMITS__MAX_CONCURRENT": "many"})


def test_environment_values_are_yaml_and_variables_naming_no_key_are_left_alone():
    config = load_config(env={"PHENOLENS_RUNTIME__TORCH_THREADS": "null",
                              "PHENOLENS_TLS__REQUIRE_CLIENT_CERT": "no",
                              "PHENOLENS_EXPLAIN__METHODS": "[occlusion, similarity]",
                              "PHENOLENS_LIMITS__MAX_TOPK": "3",  # no such key: ignored
                              "PHENOLENS_NOSECTION__KEY": "x"})
    assert config.runtime.torch_threads is None and config.tls.require_client_cert is False
    assert config.explain.methods == ("occlusion", "similarity")
    assert config.limits.max_top_k == load_config(env={}).limits.max_top_k
    with pytest.raises(ConfigError, match="PHENOLENS_AUTH__TOKENS: not a YAML value"):
        load_config(env={"PHENOLENS_AUTH__TOKENS": "[{name: a"})


def test_errors_name_the_key_and_never_repeat_a_token(tmp_path):
    with pytest.raises(ConfigError, match=r"limits.max_top_k: .*not a boolean"):
        load_config(env={}, limits={"max_top_k": True})
    with pytest.raises(ConfigError, match=r"auth.tokens\[0\]: unknown key.*'tokn'.*'token'"):
        load_config(env={"PHENOLENS_AUTH__TOKENS": "[{name: a, tokn: sekrit}]"})
    with pytest.raises(ConfigError, match="auth.tokens") as bad:
        load_config(env={"PHENOLENS_AUTH__TOKENS": "{name: a, token: sekrit}"})
    assert "sekrit" not in str(bad.value)
    listed = tmp_path / "list.yaml"
    listed.write_text("- listen\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listed, env={})


def test_mutual_tls_without_server_certificate_is_refused():
    with pytest.raises(ConfigError, match="client_ca"):
        load_config(env={"PHENOLENS_TLS__CLIENT_CA": "/tmp/ca.pem"})


def test_tokens_are_kept_hashed_and_scopes_enforced():
    config = load_config(env={"PHENOLENS_AUTH__TOKENS":
                              f"[{{name: r, scopes: [read], sha256: {hash_token('r1')}}},"
                              " {name: a, scopes: [admin], token: a1}]"})
    auth = TokenAuth(config.auth.tokens)
    reader = auth.authenticate([("authorization", "Bearer r1")])
    admin = auth.authenticate([("authorization", "Bearer a1")])
    assert reader.allows(READ) and not reader.allows(ADMIN)
    assert admin.allows(READ) and admin.allows(ADMIN)
    with pytest.raises(Unauthenticated):
        auth.authenticate([])
    with pytest.raises(Unauthenticated):
        auth.authenticate([("authorization", "Bearer nope")])
    with pytest.raises(PermissionDenied):
        auth.authorize(reader, "/phenolens.v1.GalleryAdmin/DeleteImages")
    auth.authorize(reader, "/grpc.health.v1.Health/Check")
    assert "a1" not in repr(config)


def test_no_tokens_means_anonymous_reads_but_no_gallery_writes():
    auth = TokenAuth(())
    anonymous = auth.authenticate([])
    assert not auth.enabled and anonymous is ANONYMOUS
    auth.authorize(anonymous, "/phenolens.v1.PhenoLens/Match")
    with pytest.raises(PermissionDenied, match="auth.tokens"):
        auth.authorize(anonymous, "/phenolens.v1.GalleryAdmin/AddImage")


def test_memory_ceiling_defaults_to_a_share_of_the_memory_the_process_may_use(tmp_path,
                                                                              monkeypatch):
    from server import limits

    assert load_config(None, env={}).limits.max_rss_bytes == limits.AUTO
    with pytest.raises(ConfigError, match="max_rss_bytes"):
        load_config(None, env={}, limits={"max_rss_bytes": -2})
    physical = limits.memory_available_bytes()
    assert physical > limits.rss_bytes() > 0  # this process runs in the memory it may use
    held = 2**30
    assert limits.rss_ceiling(limits.AUTO, held) == min(int(limits.AUTO_SHARE * physical),
                                                        held + limits.AUTO_HEADROOM_BYTES)
    assert limits.rss_ceiling(0) == 0 and limits.rss_ceiling(123) == 123
    # A container's cgroup limit below physical RAM wins; "max" (no limit) does not.
    v2 = tmp_path / "memory.max"
    monkeypatch.setattr(limits, "_CGROUP_LIMITS", (str(v2),))
    v2.write_text("max\n")
    assert limits.memory_available_bytes() == physical
    pod = min(physical // 4, 2 * 2**30)  # a pod's limit: its 85 % is under RSS + headroom
    v2.write_text(f"{pod}\n")
    assert limits.memory_available_bytes() == pod
    assert limits.HeavyWorkLimiter(1, 1.0, trim_memory=False,
                                   max_rss_bytes=limits.AUTO).max_rss_bytes == \
        int(limits.AUTO_SHARE * pod)
    v2.write_text(f"{64 * 2**30}\n")  # a big machine or pod: RSS + headroom wins
    assert limits.rss_ceiling(limits.AUTO, held) == min(
        held + limits.AUTO_HEADROOM_BYTES, int(limits.AUTO_SHARE * min(physical, 64 * 2**30)))
