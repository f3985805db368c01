"""Campaign statuses and the only transitions between them (written by compare-and-set)."""

from mailer.errors import Conflict
from mailer.statuses import CampaignStatus as S

TRANSITIONS: dict[str, frozenset[S]] = {
    "schedule": frozenset({S.DRAFT, S.SCHEDULED}),
    "send": frozenset({S.DRAFT, S.SCHEDULED}),
    "start": frozenset({S.SCHEDULED}),
    "pause": frozenset({S.RUNNING}),
    "resume": frozenset({S.PAUSED}),
    "cancel": frozenset({S.DRAFT, S.SCHEDULED, S.RUNNING, S.PAUSED}),
    "finish": frozenset({S.RUNNING}),
}
"""For each action, the statuses it may start from."""

TARGET: dict[str, S] = {
    "schedule": S.SCHEDULED,
    "send": S.RUNNING,
    "start": S.RUNNING,
    "pause": S.PAUSED,
    "resume": S.RUNNING,
    "cancel": S.CANCELLED,
    "finish": S.SENT,
}

EDITABLE = frozenset({S.DRAFT, S.SCHEDULED})


def check_transition(action: str, current: str) -> S:
    """The status ``action`` leads to from ``current``, or ``Conflict`` saying why not."""
    allowed = TRANSITIONS[action]
    if current not in allowed:
        names = ", ".join(sorted(s.value for s in allowed))
        raise Conflict(f"cannot {action} a campaign that is {current} (only from: {names})")
    return TARGET[action]
