"""TXT look-ups (dnspython), for ``mailer doctor`` to compare what is published with the keys."""

import dns.asyncresolver
import dns.exception
import dns.resolver

TIMEOUT_SECONDS = 3.0


class DnsUnavailable(Exception):
    """The question could not be answered: no resolver, a timeout, every server failing.
    The message is the kind of failure (e.g. ``LifetimeTimeout``)."""


async def lookup_txt(name: str) -> str | None:
    """The first TXT record at ``name`` (its strings joined), or ``None`` if there is none."""
    try:
        answer = await dns.asyncresolver.resolve(name, "TXT", lifetime=TIMEOUT_SECONDS)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except (dns.exception.DNSException, OSError) as exc:
        raise DnsUnavailable(type(exc).__name__) from None
    for record in answer:
        return b"".join(record.strings).decode("ascii", "replace")
    return None
