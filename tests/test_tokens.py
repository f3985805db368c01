"""The token codec: round trips, tampering, purposes, key order and expiry (G4)."""

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer.domain.tokens import (
    CONFIRM_MAX_AGE_SECONDS,
    LinkClaim,
    RowPurpose,
    RowTokens,
    TokenCodec,
)
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


# -- row tokens (VERP bounce and mailto unsubscribe addresses) --------------------------------

ROW_IDS = st.integers(0, 16**16 - 1)
LOCAL_PART_MAX = 64


@settings(max_examples=300)
@given(ROW_IDS, st.sampled_from(RowPurpose))
def test_row_token_round_trip_in_any_case(row_id: int, purpose: RowPurpose) -> None:
    """A row token names its row, fits a local part with its prefix, and survives case-folding."""
    rows = RowTokens(["k1"])
    token = rows.mint(purpose, row_id)
    assert rows.read(purpose, token) == row_id
    assert rows.read(purpose, token.upper()) == row_id
    assert token == token.lower()
    assert set(token) <= set(string.hexdigits.lower() + "-")
    assert len(f"unsubscribe+{token}") <= LOCAL_PART_MAX


@settings(max_examples=300)
@given(ROW_IDS, st.data())
def test_row_token_any_single_change_is_refused(row_id: int, data: st.DataObject) -> None:
    """Changing, dropping or adding one character (other than its case) makes it invalid."""
    rows = RowTokens(["k1"])
    token = rows.mint(RowPurpose.BOUNCE, row_id)
    i = data.draw(st.integers(0, len(token) - 1))
    alphabet = string.ascii_letters + string.digits + "-_.+"
    op = data.draw(st.sampled_from(["replace", "drop", "insert"]))
    if op == "replace":
        ch = data.draw(st.sampled_from(alphabet).filter(lambda x: x.lower() != token[i]))
        mutated = token[:i] + ch + token[i + 1 :]
    elif op == "drop":
        mutated = token[:i] + token[i + 1 :]
    else:
        mutated = token[:i] + data.draw(st.sampled_from(alphabet)) + token[i:]
    with pytest.raises(BadToken):
        rows.read(RowPurpose.BOUNCE, mutated)


def test_row_token_of_another_row_or_purpose_is_refused() -> None:
    """The MAC covers the row id and the purpose: no token can be moved to another row or use."""
    rows = RowTokens(["k1"])
    bounce = rows.mint(RowPurpose.BOUNCE, 41)
    with pytest.raises(BadToken):
        rows.read(RowPurpose.UNSUBSCRIBE, bounce)
    ident, _, mac = bounce.partition("-")
    assert ident == "29"  # 41 in hex
    with pytest.raises(BadToken):
        rows.read(RowPurpose.BOUNCE, f"2a-{mac}")
    with pytest.raises(BadToken):  # the MAC covers the spelling: no second name for a row
        rows.read(RowPurpose.BOUNCE, f"029-{mac}")


def test_row_tokens_first_key_signs_all_keys_verify() -> None:
    """Rotation as for links: ``new,old`` reads tokens minted under ``old``; ``new`` signs."""
    old, new = RowTokens(["old"]), RowTokens(["new", "old"])
    minted_before = old.mint(RowPurpose.UNSUBSCRIBE, 7)
    assert new.read(RowPurpose.UNSUBSCRIBE, minted_before) == 7
    minted_now = new.mint(RowPurpose.UNSUBSCRIBE, 7)
    assert RowTokens(["new"]).read(RowPurpose.UNSUBSCRIBE, minted_now) == 7
    with pytest.raises(BadToken):
        old.read(RowPurpose.UNSUBSCRIBE, minted_now)
    with pytest.raises(BadToken):
        RowTokens(["other"]).read(RowPurpose.UNSUBSCRIBE, minted_before)


@settings(max_examples=200)
@given(st.text(max_size=100))
def test_row_token_garbage_raises_only_bad_token(text: str) -> None:
    rows = RowTokens(["k1"])
    for purpose in RowPurpose:
        with pytest.raises(BadToken):
            rows.read(purpose, text)


def test_row_tokens_need_a_key() -> None:
    with pytest.raises(ValueError, match="key"):
        RowTokens([])
