"""Settings: defaults, layering (toml < MAILER_CONFIG < env) and one readable error."""

from pathlib import Path

import pytest

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
    ],
)
def test_bad_value_is_one_readable_error(env: dict[str, str], fragment: str) -> None:
    """A bad value raises ConfigError naming the setting, on one line."""
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=env)
    assert fragment in caught.value.message
    assert "\n" not in caught.value.message


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


def test_dkim_settings_are_refused_until_signing_exists() -> None:
    """Setting MAILER_DKIM_* is an error rather than silently sending unsigned mail."""
    with pytest.raises(ConfigError, match="DKIM signing is not available"):
        load_settings(environ={"MAILER_DKIM_DOMAIN": "example.org"})
