"""A token bucket over an injected clock (seconds, monotonic)."""

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; starts full."""

    rate: float
    burst: float
    _tokens: float = field(init=False)
    _stamp: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._tokens = self.burst

    def _refill(self, now: float) -> None:
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self, now: float) -> float:
        """Take one token. Return 0.0 on success, else the seconds until one is available."""
        wait = self.wait(now)
        if wait == 0.0:
            self._tokens -= 1.0
        return wait

    def wait(self, now: float) -> float:
        """Seconds until a token is available (0.0: now), without taking it."""
        self._refill(now)
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self.rate

    def spend(self, now: float) -> None:
        """Take one token even if none is left (the debt delays the next ``wait``)."""
        self._refill(now)
        self._tokens -= 1.0


def grant(
    tokens: float, elapsed: float, rate: float, burst: float, want: int
) -> tuple[int, float, float]:
    """Refill a bucket by ``elapsed`` seconds at ``rate`` (capped at ``burst``), then take up to
    ``want`` whole tokens.

    Returns ``(granted, tokens left, wait)``: ``wait`` is the seconds until a whole token is
    there when none was granted (0.0 otherwise). A clock that went back refills nothing.
    """
    level = min(burst, tokens + max(0.0, elapsed) * rate)
    got = max(0, min(want, int(level)))
    left = level - got
    return got, left, 0.0 if got else (1.0 - left) / rate


class KeyedLimiter:
    """One token bucket per key, e.g. per API key id."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(per_minute * 2)
        self._buckets: dict[object, TokenBucket] = {}

    def take(self, key: object, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
        return bucket.take(now)
