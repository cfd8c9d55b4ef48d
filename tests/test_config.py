"""Configuration: the design.md keys load, and every mistake names the file and the key (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node import config

REPO = Path(__file__).resolve().parents[1]
VALID = """
[node]
ae_title = "TELENODE"
host = "127.0.0.1"
port = 11112
data_dir = "var"
allowed_calling_aets = ["CT01"]

[anonymization]
profile_options = ["retain_device_identity"]
organization = "ORG"
key_file = "keys/pseudonym.key"

[[destinations]]
name = "telerad"
ae_title = "TELERAD"
host = "127.0.0.1"
port = 11113
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "telenode.toml"
    path.write_text(text)
    return path


def test_example_config_loads_with_paths_relative_to_its_folder():
    settings = config.load(REPO / "config" / "telenode.example.toml")
    assert settings.port == 11112
    assert settings.data_dir == (REPO / "var").resolve()
    assert settings.destinations[0].ae_title == "TELERAD"


def test_design_keys_load_and_relative_paths_resolve_against_config_folder(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    settings = config.load(write(tmp_path, VALID))
    assert settings.data_dir == tmp_path / "var"
    assert settings.key_file == tmp_path / "keys" / "pseudonym.key"
    assert settings.allowed_calling_aets == ("CT01",)
    assert settings.profile_options == ("retain_device_identity",)
    assert settings.destinations[0].port == 11113


@pytest.mark.parametrize(
    "change, key",
    [
        (("port = 11112", 'port = "11112"'), "node.port"),
        (("port = 11112", "port = 70000"), "node.port"),
        (('ae_title = "TELENODE"', 'ae_title = "THIS_AE_TITLE_IS_TOO_LONG"'), "node.ae_title"),
        (('host = "127.0.0.1"\nport = 11112', 'host = "127.0.0.1"\nport = 11112\nbogus = 1'), "node.bogus"),
        (('organization = "ORG"', 'organization = "ORG"\nsalt = "x"'), "anonymization.salt"),
        (('["retain_device_identity"]', '["retain_everything"]'), "anonymization.profile_options"),
        (('["retain_device_identity"]', '["retain_long_full_dates", "retain_long_modified_dates"]'),
         "anonymization.profile_options"),
        (('allowed_calling_aets = ["CT01"]', 'allowed_calling_aets = "CT01"'), "node.allowed_calling_aets"),
        (('name = "telerad"\n', ""), "destinations[0].name"),
        (("port = 11113", "port = 11113\nretries = 3"), "destinations[0].retries"),
        (('organization = "ORG"', 'organization = "ORG"\nburned_in = "ignore"'), "anonymization.burned_in"),
        (('organization = "ORG"', 'organization = "ORG"\nleak_guard = "yes"'), "anonymization.leak_guard"),
        (('organization = "ORG"', 'organization = "ORG"\noverrides = { NoSuchKeyword = "keep" }'),
         "anonymization.overrides.NoSuchKeyword"),
        (('organization = "ORG"', 'organization = "ORG"\noverrides = { InstitutionName = "blank" }'),
         "anonymization.overrides.InstitutionName"),
        (('organization = "ORG"', 'organization = "ORG"\npixel_rules = [{ modality = "US" }]'),
         "anonymization.pixel_rules[0].rectangles"),
        (('organization = "ORG"', 'organization = "ORG"\npixel_rules = [{ rectangles = [[0, 0, 0, 5]] }]'),
         "anonymization.pixel_rules[0].rectangles"),
        (('data_dir = "var"', 'data_dir = "var"\nmin_free_mb = -1'), "node.min_free_mb"),
        (('data_dir = "var"', 'data_dir = "var"\nstop_timeout = 0'), "node.stop_timeout"),
        (("port = 11113", "port = 11113\nparallel = 64"), "destinations[0].parallel"),
        (("port = 11113", 'port = 11113\ndefault = "yes"'), "destinations[0].default"),
    ],
)
def test_mistakes_name_file_and_key(tmp_path, change, key):
    old, new = change
    assert old in VALID
    path = write(tmp_path, VALID.replace(old, new, 1))
    with pytest.raises(config.ConfigError) as caught:
        config.load(path)
    assert str(path) in str(caught.value)
    assert key in str(caught.value)


def test_anonymization_extensions_load(tmp_path):
    """burned_in, leak_guard, overrides (keyword or tag) and pixel_rules are typed on load."""
    text = VALID.replace('key_file = "keys/pseudonym.key"', """key_file = "keys/pseudonym.key"
burned_in = "reject"
leak_guard = false
pixel_rules = [{ modality = "US", rows = 480, rectangles = [[0, 0, 640, 40]] }]
[anonymization.overrides]
InstitutionName = { set = "ORG" }
"(0008,1030)" = "keep"
PatientSex = "empty"
""")
    settings = config.load(write(tmp_path, text))
    assert settings.burned_in == "reject" and settings.leak_guard is False
    assert settings.overrides == ((0x00080080, "set", "ORG"), (0x00081030, "keep", None), (0x00100040, "empty", None))
    rule = settings.pixel_rules[0]
    assert rule.modality == "US" and rule.rows == 480 and rule.rectangles == ((0, 0, 640, 40),)
    defaults = config.load(write(tmp_path, VALID))
    assert defaults.burned_in == "quarantine" and defaults.leak_guard is True and defaults.overrides == ()


def test_missing_destination_is_an_error(tmp_path):
    path = write(tmp_path, VALID.split("[[destinations]]")[0])
    with pytest.raises(config.ConfigError, match="destinations"):
        config.load(path)


def test_key_file_that_is_a_folder_is_an_error(tmp_path):
    (tmp_path / "keys" / "pseudonym.key").mkdir(parents=True)
    with pytest.raises(config.ConfigError, match="anonymization.key_file"):
        config.load(write(tmp_path, VALID))


def serve(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_serve_exits_2_with_one_message_naming_file_and_key(tmp_path):
    path = write(tmp_path, VALID.replace("port = 11112", 'port = "eleven"'))
    result = serve(path)
    assert result.returncode == 2
    assert str(path) in result.stderr and "node.port" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_exits_2_on_malformed_key_file(tmp_path):
    key = tmp_path / "keys" / "pseudonym.key"
    key.parent.mkdir()
    key.write_text("not-a-secret-key\n")
    result = serve(write(tmp_path, VALID))
    assert result.returncode == 2
    assert "anonymization.key_file" in result.stderr and str(key) in result.stderr
    assert "not-a-secret-key" not in result.stderr


def test_serve_exits_2_without_destinations(tmp_path):
    result = serve(write(tmp_path, VALID.split("[[destinations]]")[0]))
    assert result.returncode == 2 and "destinations" in result.stderr


# -- issue 5/6 keys: workers, TLS, security ------------------------------------------------------

def test_workers_default_to_one_per_core_and_accept_an_integer(tmp_path):
    import os

    assert config.load(write(tmp_path, VALID)).workers == min(len(os.sched_getaffinity(0)), 8)
    text = VALID.replace("[node]\n", "[node]\nworkers = 3\n")
    assert config.load(write(tmp_path, text)).workers == 3
    for bad in ("0", '"many"', "true"):
        with pytest.raises(config.ConfigError, match=r"node\.workers"):
            config.load(write(tmp_path, VALID.replace("[node]\n", f"[node]\nworkers = {bad}\n")))


def test_ack_defaults_to_after_deidentification_and_accepts_received(tmp_path):
    assert config.load(write(tmp_path, VALID)).ack == "deidentified"
    received = config.load(write(tmp_path, VALID.replace("[node]\n", '[node]\nack = "received"\n')))
    assert received.ack == "received" and received.received_dir == received.data_dir / "received"
    for bad in ('"stored"', "true"):
        with pytest.raises(config.ConfigError, match=r"node\.ack"):
            config.load(write(tmp_path, VALID.replace("[node]\n", f"[node]\nack = {bad}\n")))


def test_non_loopback_destination_without_tls_is_a_warning_not_an_error(tmp_path):
    remote = VALID.replace('host = "127.0.0.1"\nport = 11113', 'host = "pacs.example.org"\nport = 11113')
    warnings = config.load(write(tmp_path, remote)).warnings
    assert len(warnings) == 1 and "telerad" in warnings[0] and "TLS is off" in warnings[0]
    assert config.load(write(tmp_path, VALID)).warnings == ()
    with_tls = remote + "\n[destinations.tls]\n"
    loaded = config.load(write(tmp_path, with_tls))
    assert loaded.warnings == () and loaded.destinations[0].tls is not None
    assert loaded.destinations[0].tls.verify_hostname and loaded.destinations[0].tls.min_version == "1.2"


def test_tls_listener_needs_readable_files_and_a_ca_for_client_certificates(tmp_path):
    (tmp_path / "node.pem").write_text("x")
    (tmp_path / "node.key").write_text("x")
    listener = VALID.replace('allowed_calling_aets = ["CT01"]\n', 'allowed_calling_aets = ["CT01"]\n\n[node.tls]\n'
                             'port = 2762\ncertificate = "node.pem"\nprivate_key = "node.key"\n')
    with pytest.raises(config.ConfigError, match=r"node\.tls\.ca_certificates: required"):
        config.load(write(tmp_path, listener))
    loaded = config.load(write(tmp_path, listener.replace("port = 2762\n", "port = 2762\nrequire_client_cert = false\n")))
    assert loaded.tls.port == 2762 and loaded.tls.certificate == tmp_path / "node.pem"
    with pytest.raises(config.ConfigError, match=r"node\.tls\.certificate: .*missing.pem is not a readable file"):
        config.load(write(tmp_path, listener.replace('"node.pem"', '"missing.pem"')))
    with pytest.raises(config.ConfigError, match=r"node\.tls\.min_version"):
        config.load(write(tmp_path, listener.replace("port = 2762\n", 'port = 2762\nmin_version = "1.0"\n')))


def test_destination_client_certificate_and_key_go_together(tmp_path):
    (tmp_path / "client.pem").write_text("x")
    text = VALID + '\n[destinations.tls]\ncertificate = "client.pem"\n'
    with pytest.raises(config.ConfigError, match=r"destinations\[0\]\.tls: certificate and private_key go together"):
        config.load(write(tmp_path, text))


def test_security_section(tmp_path):
    text = VALID + '\n[security]\noperators = ["alice", "bob"]\naudit_file = "audit/trail.jsonl"\n'
    loaded = config.load(write(tmp_path, text))
    assert loaded.operators == ("alice", "bob")
    assert loaded.audit_file == tmp_path / "audit" / "trail.jsonl"
    assert loaded.mapping_key == tmp_path / "keys" / "mapping.key"  # beside key_file by default
    with pytest.raises(config.ConfigError, match=r"security\.operators"):
        config.load(write(tmp_path, VALID + '\n[security]\noperators = [""]\n'))
    with pytest.raises(config.ConfigError, match=r"security\.nope: unknown key"):
        config.load(write(tmp_path, VALID + '\n[security]\nnope = 1\n'))
