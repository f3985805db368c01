"""Settings: defaults, layering (toml < MAILER_CONFIG < env) and one readable error."""

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from mailer.config import load_settings
from mailer.errors import ConfigError


def test_defaults_match_the_product_contract() -> None:
    """With nothing set, the documented defaults apply."""
    s = load_settings(environ={})
    assert s.database_url == "sqlite+aiosqlite:///var/mailer.db"
    assert (s.http_host, s.http_port) == ("127.0.0.1", 8080)
    assert s.base_url == "http://127.0.0.1:8080"
    assert s.from_addr == "news@example.org"
    assert s.api_rate_per_minute == 60
    assert s.confirm_resend_minutes == 10
    assert s.uses_capture and s.smtp_tls == "none"
    assert not s.inbound_enabled and s.inbound_host == "127.0.0.1"


def test_layering(tmp_path: Path) -> None:
    """MAILER_CONFIG overrides config/mailer.toml, and MAILER_* variables override both."""
    extra = tmp_path / "extra.toml"
    extra.write_text('http_port = 9000\nfrom = "list@example.net"\norg_name = "From file"\n')
    s = load_settings(
        environ={
            "MAILER_CONFIG": str(extra),
            "MAILER_ORG_NAME": "From env",
            "MAILER_FROM": "x@y.org",
        }
    )
    assert s.http_port == 9000
    assert s.org_name == "From env"
    assert s.from_addr == "x@y.org"


def test_lists_from_env() -> None:
    """Comma-separated env values become lists; the first secret key is kept first."""
    s = load_settings(
        environ={"MAILER_SECRET_KEYS": "new, old", "MAILER_TRUSTED_PROXIES": "10.0.0.0/8,::1"}
    )
    assert [k.get_secret_value() for k in s.secret_keys] == ["new", "old"]
    assert [str(n) for n in s.trusted_proxies] == ["10.0.0.0/8", "::1/128"]


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"MAILER_HTTP_PORT": "eighty"}, "MAILER_HTTP_PORT"),
        ({"MAILER_HTTP_PORT": "70000"}, "MAILER_HTTP_PORT"),
        ({"MAILER_SMTP_TLS": "maybe"}, "MAILER_SMTP_TLS"),
        ({"MAILER_BASE_URL": "ftp://x"}, "MAILER_BASE_URL"),
        ({"MAILER_TRUSTED_PROXIES": "not-an-ip"}, "not-an-ip"),
        ({"MAILER_API_RATE_PER_MINUTE": "0"}, "MAILER_API_RATE_PER_MINUTE"),
        ({"MAILER_INBOUND_PORT": "-1"}, "MAILER_INBOUND_PORT"),
        ({"MAILER_BOUNCE_DOMAIN": "bounces@example.org"}, "MAILER_BOUNCE_DOMAIN"),
        ({"MAILER_BOUNCE_DOMAIN": "exämple.org"}, "MAILER_BOUNCE_DOMAIN"),
        ({"MAILER_INBOUND_PORT": "2525", "MAILER_FROM": "news@exämple.org"}, "BOUNCE_DOMAIN"),
    ],
)
def test_bad_value_is_one_readable_error(env: dict[str, str], fragment: str) -> None:
    """A bad value raises ConfigError naming the setting, on one line."""
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=env)
    assert fragment in caught.value.message
    assert "\n" not in caught.value.message


def test_inbound_settings() -> None:
    """Inbound is on when the port is set; its domain defaults to MAILER_FROM's, lower-cased."""
    s = load_settings(environ={"MAILER_INBOUND_PORT": "2525", "MAILER_FROM": "News@Example.ORG"})
    assert s.inbound_enabled and s.inbound_port == 2525
    assert s.inbound_domain == "example.org"
    s = load_settings(
        environ={"MAILER_INBOUND_PORT": "25", "MAILER_BOUNCE_DOMAIN": "Bounces.Example.org."}
    )
    assert s.inbound_domain == "bounces.example.org"


def test_bad_config_files(tmp_path: Path) -> None:
    """A missing file, invalid TOML or an unknown key are each refused with the cause."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(environ={"MAILER_CONFIG": str(tmp_path / "missing.toml")})
    broken = tmp_path / "broken.toml"
    broken.write_text("http_port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(environ={"MAILER_CONFIG": str(broken)})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("htpp_port = 1\n")
    with pytest.raises(ConfigError, match="htpp_port"):
        load_settings(environ={"MAILER_CONFIG": str(unknown)})


def test_dkim_settings_refuse_unsafe_or_unusable_keys(tmp_path: Path) -> None:
    """MAILER_DKIM_*: a key readable by others, missing, or not a private key stops the start."""
    key = ed25519.Ed25519PrivateKey.generate()
    good = tmp_path / "good.pem"
    good.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    good.chmod(0o600)
    public = tmp_path / "public.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    public.chmod(0o600)
    loose = tmp_path / "loose.pem"
    loose.write_bytes(good.read_bytes())
    loose.chmod(0o640)

    def env(key_file: Path | str, selector: str = "s1") -> dict[str, str]:
        return {
            "MAILER_DKIM_DOMAIN": "example.org",
            "MAILER_DKIM_SELECTOR": selector,
            "MAILER_DKIM_KEY_FILE": str(key_file),
        }

    s = load_settings(environ=env(good))
    assert (s.dkim_domain, s.dkim_selector, s.dkim_key_file) == ("example.org", ["s1"], [good])
    cases = [
        (env(loose), "readable by group or others"),
        (env(tmp_path / "nope.pem"), "No such file"),
        (env(public), "not an unencrypted PEM private key"),
        (env(f"{good},{good}", "a,b"), "at most one RSA and one Ed25519"),
        (env(good, "a,b"), "one per key"),
        ({"MAILER_DKIM_DOMAIN": "example.org"}, "needs MAILER_DKIM_DOMAIN"),
    ]
    for environ, message in cases:
        with pytest.raises(ConfigError, match=message) as caught:
            load_settings(environ=environ)
        assert "\n" not in str(caught.value)


def test_webhook_secrets_are_a_list_of_long_secrets_never_echoed() -> None:
    """MAILER_WEBHOOK_SECRETS is comma-separated; a short one is refused without showing it."""
    assert load_settings(environ={}).webhook_secrets == []
    s = load_settings(environ={"MAILER_WEBHOOK_SECRETS": f"{'n' * 16}, {'o' * 40}"})
    assert [k.get_secret_value() for k in s.webhook_secrets] == ["n" * 16, "o" * 40]
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"MAILER_WEBHOOK_SECRETS": f"{'n' * 16},tooshort-secret"})
    assert "MAILER_WEBHOOK_SECRETS" in caught.value.message
    assert "16 characters" in caught.value.message
    assert "tooshort" not in caught.value.message
