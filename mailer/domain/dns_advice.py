"""The DNS records an operator publishes for mail that passes DKIM, SPF and DMARC.

The DKIM record is exact (computed from the key); SPF and DMARC are advice to adapt: SPF must
name whatever actually hands the mail to the Internet, and a DMARC policy starts at ``p=none``.
"""

import ipaddress
from dataclasses import dataclass

_LOCAL_RELAYS = frozenset({"localhost", "localhost.localdomain"})


@dataclass(frozen=True, slots=True)
class DnsRecord:
    name: str
    type: str
    value: str
    note: str

    def zone_line(self) -> str:
        """The record as a zone-file line, e.g. ``name IN TXT "value"``."""
        return f"{self.name} IN {self.type} {zone_txt(self.value)}"


def zone_txt(value: str) -> str:
    """A TXT value as zone-file strings of at most 255 characters each."""
    return " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))


def domain_of(address: str) -> str:
    """The lower-case domain of an email address."""
    return address.rpartition("@")[2].lower()


def tags(record: str) -> dict[str, str]:
    """The ``tag=value`` pairs of a DKIM or DMARC record, whitespace removed from values."""
    found = {}
    for part in record.split(";"):
        key, eq, value = part.partition("=")
        if eq:
            found[key.strip().lower()] = "".join(value.split())
    return found


def same_dkim_key(published: str, expected: str) -> bool:
    """True when a published DKIM record carries the key of ``expected`` (``k=`` and ``p=``)."""
    have, want = tags(published), tags(expected)
    return have.get("k", "rsa") == want.get("k", "rsa") and have.get("p") == want.get("p")


def aligned(from_domain: str, dkim_domain: str) -> bool:
    """DMARC relaxed alignment, approximated: one domain is the other or a subdomain of it.

    (The exact rule compares organisational domains, which needs the public suffix list.)
    """
    a, b = from_domain.lower().rstrip("."), dkim_domain.lower().rstrip(".")
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def dkim_record(selector: str, domain: str, public_record: str) -> DnsRecord:
    return DnsRecord(
        f"{selector}._domainkey.{domain}",
        "TXT",
        public_record,
        f"DKIM public key for selector {selector}: publish exactly this value, or every "
        "signature fails at the receiver",
    )


def _relay_mechanism(relay_host: str | None) -> str | None:
    """The SPF mechanism that authorises the relay, or ``None`` for a relay on this machine."""
    if relay_host is None or relay_host.lower() in _LOCAL_RELAYS:
        return None
    try:
        ip = ipaddress.ip_address(relay_host)
    except ValueError:
        return f"a:{relay_host.lower()}"
    if ip.is_loopback:
        return None
    return f"ip{ip.version}:{ip}"


def spf_advice(from_domain: str, relay_host: str | None) -> DnsRecord:
    """SPF for the From/envelope domain: the domain's MX hosts plus the relay mailer uses."""
    mechanism = _relay_mechanism(relay_host)
    value = " ".join(["v=spf1", "mx", *([mechanism] if mechanism else []), "~all"])
    if mechanism is None:
        where = (
            "mail leaves through a server on this machine: add its public address "
            "(ip4:... or a:host)"
        )
    else:
        where = (
            f"{mechanism} authorises the relay {relay_host}; if your provider publishes an "
            "SPF include, use include:... instead"
        )
    return DnsRecord(
        from_domain,
        "TXT",
        value,
        f"advice: SPF for the From and bounce domain {from_domain}; {where}. A domain has "
        "one SPF record: merge with an existing one. Keep ~all until the DMARC reports are clean",
    )


def dmarc_advice(from_domain: str, dkim_domain: str | None) -> DnsRecord:
    """A first DMARC policy: report only (``p=none``), aggregate reports to postmaster."""
    if dkim_domain is None:
        alignment = "mailer does not sign: DMARC then passes only through SPF or your relay's DKIM"
    elif aligned(from_domain, dkim_domain):
        alignment = f"DKIM d={dkim_domain} aligns with From {from_domain}"
    else:
        alignment = (
            f"DKIM d={dkim_domain} does not align with From {from_domain}: DMARC then passes "
            f"only through SPF; sign with d={from_domain} or a parent of it"
        )
    return DnsRecord(
        f"_dmarc.{from_domain}",
        "TXT",
        f"v=DMARC1; p=none; rua=mailto:postmaster@{from_domain}",
        f"advice: start at p=none and read the aggregate reports; once all your mail passes, "
        f"move to p=quarantine, then p=reject. {alignment}",
    )
