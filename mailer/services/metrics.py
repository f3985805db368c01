"""Prometheus metrics, on a registry owned by one running mailer (no module-level state)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.opt_ins = Counter(
            "mailer_opt_in_requests", "Opt-in requests by outcome", ["outcome"], registry=r
        )
        self.confirmations = Counter("mailer_confirmations", "Subscriptions confirmed", registry=r)
        self.unsubscribes = Counter(
            "mailer_unsubscribes",
            "Unsubscribe requests by channel and scope",
            ["channel", "scope"],
            registry=r,
        )
        self.messages = Counter(
            "mailer_messages",
            "Outbox messages by kind and final state",
            ["kind", "state"],
            registry=r,
        )
        self.handoff = Histogram(
            "mailer_check_to_handoff_seconds",
            "Seconds from the consent check committing to the relay's reply to DATA",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.feedback = Counter(
            "mailer_feedback",
            "Bounce and complaint reports by kind and what they did",
            ["kind", "applied"],
            registry=r,
        )
        self.rate_limited = Counter(
            "mailer_api_rate_limited", "API requests refused with 429", registry=r
        )
        self.worker_busy = Gauge("mailer_worker_busy", "Send tasks handing off now", registry=r)
        self.relay_backoff = Gauge(
            "mailer_relay_backoff_seconds",
            "How long sending pauses after the relay refused or failed (0: relay healthy)",
            registry=r,
        )

        self.leases_lost = Counter(
            "mailer_leases_lost",
            "Claimed messages not sent because their lease had been reaped or taken",
            registry=r,
        )
        self.lease_refusals = Counter(
            "mailer_lease_refusals",
            "Messages put back unsent because their lease was too close to its end",
            ["at"],
            registry=r,
        )
        self.leases_reaped = Counter(
            "mailer_leases_reaped",
            "Expired claims (of any sender) reported failed as interrupted by this one",
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
