"""Settings, loaded once: ``config/mailer.toml`` < ``$MAILER_CONFIG`` < ``MAILER_*`` env vars.

Keys in the TOML files are the env names without the ``MAILER_`` prefix, lower-cased.
A bad value anywhere raises one ``ConfigError`` that names the setting and the problem.
"""

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from mailer.errors import ConfigError

ENV_PREFIX = "MAILER_"
DEFAULT_CONFIG_FILE = Path("config/mailer.toml")
PACKAGE_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_DOMAIN = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}")
SECRET_FIELDS = frozenset({"secret_keys", "smtp_password", "webhook_secrets"})
WEBHOOK_SECRET_MIN_LENGTH = 16


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseModel):
    """Every setting mailer reads. Field names match the env names (``MAILER_`` + upper case)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    database_url: str = "sqlite+aiosqlite:///var/mailer.db"
    base_url: str = "http://127.0.0.1:8080"
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=1, le=65535)
    smtp_host: str | None = None
    smtp_port: int | None = Field(None, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_tls: Literal["none", "starttls", "tls"] = "none"
    smtp_timeout: float = Field(30.0, gt=0)
    secret_keys: list[SecretStr] = Field(default_factory=list)
    from_addr: str = Field("news@example.org", alias="from")
    org_name: str = "Example Org"
    org_address: str = "1 Example Street, 00000 Example City"
    privacy_contact: str = "privacy@example.org"
    inbound_host: str = "127.0.0.1"
    inbound_port: int | None = Field(None, ge=0, le=65535)
    """Unset: inbound mail (bounces, complaints, ``mailto:`` unsubscribe) is off. 0: any port."""
    bounce_domain: str | None = None
    """The domain of the inbound addresses; unset: the domain of ``from``."""
    dkim_domain: str | None = None
    dkim_selector: list[str] = Field(default_factory=list)
    """One selector per key file, in the same order (comma-separated in the env)."""
    dkim_key_file: list[Path] = Field(default_factory=list)
    """PEM private keys, comma-separated: RSA (2048 bits or more) and/or Ed25519. Two keys of
    different types sign every message twice (dual signing); the type is read from the key."""
    trusted_proxies: list[IPNetwork] = Field(default_factory=list)
    api_rate_per_minute: int = Field(60, ge=1)
    confirm_resend_minutes: int = Field(10, ge=0)
    var_dir: Path = Path("var")
    templates_dir: Path = PACKAGE_TEMPLATES
    smtp_connections: int = Field(16, ge=1, le=256)
    smtp_rate: float = Field(0.0, ge=0)
    """Messages per second; 0 is as fast as the relay accepts. With PostgreSQL the rate
    holds for the whole deployment (a bucket in the database), on SQLite for the process."""
    smtp_give_up_hours: float = Field(24.0, gt=0)
    worker_poll_seconds: float = Field(1.0, gt=0)
    lease_seconds: float = Field(60.0, ge=0.5)
    """How long a sender's claim on a message holds without renewal (PostgreSQL): a sender
    that stops for longer loses it, and the message is reported, never sent twice."""
    soft_bounce_limit: int = Field(5, ge=1)
    """Soft bounces within ``soft_bounce_days`` after which an address is suppressed."""
    soft_bounce_days: int = Field(30, ge=1)
    webhook_secrets: list[SecretStr] = Field(default_factory=list)
    """HMAC keys for ``POST /api/v1/events``, comma-separated; any verifies (rotation).
    None: the route answers 404."""

    @field_validator(
        "secret_keys", "dkim_selector", "dkim_key_file", "webhook_secrets", mode="before"
    )
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("webhook_secrets")
    @classmethod
    def _webhook_secrets(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(len(v.get_secret_value()) < WEBHOOK_SECRET_MIN_LENGTH for v in value):
            raise ValueError(
                f"each secret needs at least {WEBHOOK_SECRET_MIN_LENGTH} characters "
                f"(e.g. the output of `openssl rand -hex 32`)"
            )
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        value = _split_csv(value)
        if isinstance(value, list):
            return [ipaddress.ip_network(str(v), strict=False) for v in value]
        return value

    @field_validator("bounce_domain")
    @classmethod
    def _bounce_domain(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().lower().rstrip(".")
        if not _DOMAIN.fullmatch(value):
            raise ValueError("must be a domain name such as bounces.example.org (IDNs as xn--)")
        return value

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _dkim(self) -> "Settings":
        given = [bool(self.dkim_domain), bool(self.dkim_selector), bool(self.dkim_key_file)]
        if any(given) and not all(given):
            raise ValueError(
                "DKIM needs MAILER_DKIM_DOMAIN, MAILER_DKIM_SELECTOR and MAILER_DKIM_KEY_FILE"
            )
        if len(self.dkim_selector) != len(self.dkim_key_file):
            raise ValueError(
                f"MAILER_DKIM_SELECTOR names {len(self.dkim_selector)} selector(s) for "
                f"{len(self.dkim_key_file)} MAILER_DKIM_KEY_FILE key(s); give one per key"
            )
        if self.inbound_enabled and not _DOMAIN.fullmatch(self.inbound_domain):
            raise ValueError(
                f"inbound mail needs an ASCII domain for its addresses, and {self.inbound_domain!r}"
                " (from MAILER_FROM) is not one; set MAILER_BOUNCE_DOMAIN"
            )
        kinds = [_check_dkim_key(path) for path in self.dkim_key_file]
        if len(set(kinds)) != len(kinds):
            raise ValueError("MAILER_DKIM_KEY_FILE: give at most one RSA and one Ed25519 key")
        return self

    @property
    def uses_capture(self) -> bool:
        """True when no relay is configured and mail goes to the embedded capture server."""
        return self.smtp_host is None

    @property
    def inbound_enabled(self) -> bool:
        """True when the inbound listener is configured (``MAILER_INBOUND_PORT`` is set)."""
        return self.inbound_port is not None

    @property
    def inbound_domain(self) -> str:
        """The domain of the VERP bounce, ``mailto:`` unsubscribe and feedback-loop addresses."""
        return self.bounce_domain or self.from_addr.rpartition("@")[2].lower()

    @property
    def outbox_dir(self) -> Path:
        return self.var_dir / "outbox"

    @property
    def secret_keys_file(self) -> Path:
        return self.var_dir / "secret_keys"


def _check_dkim_key(path: Path) -> str:
    """The key's type ("rsa" or "ed25519"); ValueError when it must not be used."""
    try:
        mode = path.stat().st_mode
        pem = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"DKIM key file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ValueError(
            f"DKIM key file {path} is readable by group or others (mode {mode & 0o777:o}); "
            f"chmod 600 it"
        )
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"DKIM key file {path} is not an unencrypted PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise ValueError(f"DKIM key file {path}: RSA key of {key.key_size} bits; use 2048")
        return "rsa"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise ValueError(f"DKIM key file {path}: only RSA and Ed25519 keys can sign DKIM")


def _env_name(field: str) -> str:
    alias = Settings.model_fields[field].alias if field in Settings.model_fields else None
    return ENV_PREFIX + (alias or field).upper()


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    known = {_env_name(name): name for name in Settings.model_fields}
    values: dict[str, Any] = {}
    for key, value in environ.items():
        if key in known:
            values[known[key]] = value
    return values


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build the settings from the layered sources; raise one readable ``ConfigError``."""
    env = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    if DEFAULT_CONFIG_FILE.is_file():
        merged.update(_read_toml(DEFAULT_CONFIG_FILE))
    if env.get("MAILER_CONFIG"):
        merged.update(_read_toml(Path(env["MAILER_CONFIG"])))
    merged = {("from_addr" if k == "from" else k): v for k, v in merged.items()}
    merged.update(_from_env(env))
    merged.update(overrides)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"unknown setting {field!r} in a config file") from None
        if field not in Settings.model_fields:  # a rule across settings, not one value
            raise ConfigError(f"settings: {first['msg'].removeprefix('Value error, ')}") from None
        shown = "" if field in SECRET_FIELDS else f" (got {str(first['input'])[:60]!r})"
        raise ConfigError(f"setting {_env_name(field)}: {first['msg']}{shown}{more}") from None
    except ValueError as exc:
        raise ConfigError(f"bad setting: {exc}") from None
