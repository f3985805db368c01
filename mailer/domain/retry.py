"""When to try a temporarily refused message again, and when to give up."""

from datetime import datetime, timedelta

BASE_DELAY = timedelta(seconds=30)
MAX_DELAY = timedelta(hours=1)


def next_attempt(
    attempts: int, first_queued: datetime, now: datetime, give_up_after: timedelta, jitter: float
) -> datetime | None:
    """Jittered exponential backoff; ``None`` once the message is older than ``give_up_after``.

    ``attempts`` counts the tries made so far; ``jitter`` is a number in [0, 1).
    """
    delay = min(MAX_DELAY, BASE_DELAY * (1 << min(attempts, 16)))
    at = now + delay * (0.5 + jitter)
    if at - first_queued > give_up_after:
        return None
    return at
