"""The token codec: round trips, tampering, purposes, key order and expiry (G4)."""

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer.domain.tokens import CONFIRM_MAX_AGE_SECONDS, LinkClaim, TokenCodec
from mailer.errors import BadToken

HEX = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
UID = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=11, max_size=11)
CLAIMS = st.builds(LinkClaim, HEX, st.none() | UID)
NOW = 1_800_000_000.0


def codec(*keys: str, now: float = NOW) -> TokenCodec:
    return TokenCodec(list(keys), clock=lambda: now)


@settings(max_examples=300)
@given(CLAIMS)
def test_round_trip(claim: LinkClaim) -> None:
    """Every claim survives signing and reading, for both purposes."""
    c = codec("k1")
    assert c.read_unsubscribe(c.unsubscribe_token(claim)) == claim
    assert c.read_confirm(c.confirm_token(claim)) == claim


@settings(max_examples=300)
@given(CLAIMS, st.data())
def test_any_single_change_is_refused(claim: LinkClaim, data: st.DataObject) -> None:
    """Changing, dropping or adding one character anywhere makes a token invalid."""
    c = codec("k1")
    token = c.unsubscribe_token(claim)
    i = data.draw(st.integers(0, len(token) - 1))
    alphabet = string.ascii_letters + string.digits + "-_.~"
    op = data.draw(st.sampled_from(["replace", "drop", "insert"]))
    if op == "replace":
        ch = data.draw(st.sampled_from(alphabet).filter(lambda x: x != token[i]))
        mutated = token[:i] + ch + token[i + 1 :]
    elif op == "drop":
        mutated = token[:i] + token[i + 1 :]
    else:
        mutated = token[:i] + data.draw(st.sampled_from(alphabet)) + token[i:]
    try:
        read = c.read_unsubscribe(mutated)
    except BadToken:
        return
    # A change inside base64 padding bits can decode to the same signature: still the same claim.
    assert read == claim


@settings(max_examples=200)
@given(st.text(max_size=300))
def test_garbage_raises_only_bad_token(text: str) -> None:
    """Arbitrary input is refused with BadToken, never another exception."""
    c = codec("k1")
    for read in (c.read_unsubscribe, c.read_confirm):
        with pytest.raises(BadToken):
            read(text)


@given(CLAIMS)
def test_payload_holds_no_address_and_is_short(claim: LinkClaim) -> None:
    """Tokens never contain an '@' and stay short enough for any mail client (< 120 chars)."""
    c = codec("k1")
    for token in (c.unsubscribe_token(claim), c.confirm_token(claim)):
        assert "@" not in token
        assert len(token) <= 120


def test_purposes_do_not_mix() -> None:
    """A confirm token is refused as an unsubscribe token and vice versa."""
    c = codec("k1")
    claim = LinkClaim("a" * 32, "list0000001")
    with pytest.raises(BadToken):
        c.read_unsubscribe(c.confirm_token(claim))
    with pytest.raises(BadToken):
        c.read_confirm(c.unsubscribe_token(claim))


def test_first_key_signs_all_keys_verify() -> None:
    """With keys K2,K1 the first (K2) signs; K1-signed tokens still verify (rotation, G4)."""
    claim = LinkClaim("b" * 32, None)
    rotated = codec("K2", "K1")
    fresh = rotated.unsubscribe_token(claim)
    assert codec("K2").read_unsubscribe(fresh) == claim
    with pytest.raises(BadToken):
        codec("K1").read_unsubscribe(fresh)
    old = codec("K1").unsubscribe_token(claim)
    assert rotated.read_unsubscribe(old) == claim
    assert codec("K3", "K2", "K1").read_unsubscribe(old) == claim


def test_confirm_expires_after_seven_days_unsubscribe_never() -> None:
    """Confirm tokens are valid up to 7 days; unsubscribe tokens have no age limit."""
    claim = LinkClaim("c" * 32, "list0000001")
    confirm = codec("k", now=NOW).confirm_token(claim)
    assert codec("k", now=NOW + CONFIRM_MAX_AGE_SECONDS - 1).read_confirm(confirm) == claim
    with pytest.raises(BadToken, match="expired"):
        codec("k", now=NOW + CONFIRM_MAX_AGE_SECONDS + 1).read_confirm(confirm)
    unsubscribe = codec("k", now=NOW).unsubscribe_token(claim)
    ten_years = 10 * 365 * 24 * 3600
    assert codec("k", now=NOW + ten_years).read_unsubscribe(unsubscribe) == claim


def test_needs_a_key() -> None:
    """A codec without keys cannot be built."""
    with pytest.raises(ValueError, match="key"):
        TokenCodec([], clock=lambda: NOW)
