"""An independent DKIM verifier for the tests: OpenDKIM's C library, libopendkim, via ctypes.

libopendkim (Debian ``libopendkim11``, from ``opendkim-tools``; OpenSSL underneath) shares no
code with dkimpy: its own parser, canonicalisation, hashing and RSA/Ed25519 verification.
Keys never come from DNS: the library's file query method (``DKIM_QUERY_FILE``, "intended for
testing") reads them from a file of ``selector._domainkey.domain record`` lines, and it
overrides any ``q=`` in the signatures. The constants below are those of ``opendkim/dkim.h``.
"""

import ctypes
import ctypes.util
from dataclasses import dataclass
from pathlib import Path

LIBRARY = ctypes.util.find_library("opendkim")
_OP_SETOPT = 1
_OPTS_QUERYMETHOD = 6
_OPTS_QUERYINFO = 7
_QUERY_FILE = 1
_STAT_OK = 0
_STAT_NOSIG = 2
_SIGFLAG_PASSED = 0x04
_SIGBH_MATCH = 0
_ALGORITHMS = {0: "rsa-sha1", 1: "rsa-sha256", 2: "ed25519-sha256"}


@dataclass(frozen=True, slots=True)
class Verdict:
    """libopendkim's result for one DKIM-Signature."""

    selector: str
    algorithm: str
    verified: bool
    """The header signature verified and the body hash matched."""
    error: str


def _bind(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    p, i = ctypes.c_void_p, ctypes.c_int
    signatures = {
        "dkim_init": (p, [p, p]),
        "dkim_close": (None, [p]),
        "dkim_options": (i, [p, i, i, p, ctypes.c_size_t]),
        "dkim_verify": (p, [p, ctypes.c_char_p, p, ctypes.POINTER(i)]),
        "dkim_chunk": (i, [p, ctypes.c_char_p, ctypes.c_size_t]),
        "dkim_eom": (i, [p, p]),
        "dkim_free": (i, [p]),
        "dkim_getresultstr": (ctypes.c_char_p, [i]),
        "dkim_getsiglist": (i, [p, ctypes.POINTER(ctypes.POINTER(p)), ctypes.POINTER(i)]),
        "dkim_sig_getflags": (ctypes.c_uint, [p]),
        "dkim_sig_getbh": (i, [p]),
        "dkim_sig_geterror": (i, [p]),
        "dkim_sig_geterrorstr": (ctypes.c_char_p, [i]),
        "dkim_sig_getselector": (ctypes.c_char_p, [p]),
        "dkim_sig_getsignalg": (i, [p, ctypes.POINTER(i)]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


_LIB = None if LIBRARY is None else _bind(LIBRARY)


def verify(raw: bytes, records: dict[str, str], tmp: Path) -> list[Verdict]:
    """libopendkim's verdict on each DKIM-Signature of ``raw``, keys served from ``records``
    (``selector._domainkey.domain`` -> TXT value), in the order the library lists them."""
    assert _LIB is not None, "libopendkim is not installed"
    keys = tmp / "opendkim-keys"
    keys.write_text("".join(f"{name} {value}\n" for name, value in records.items()))
    lib = _LIB.dkim_init(None, None)
    assert lib, "dkim_init failed"
    try:
        method = ctypes.c_int(_QUERY_FILE)
        path = ctypes.create_string_buffer(str(keys).encode())
        for option, value, size in (
            (_OPTS_QUERYMETHOD, ctypes.byref(method), ctypes.sizeof(method)),
            (_OPTS_QUERYINFO, path, len(path)),
        ):
            assert _LIB.dkim_options(lib, _OP_SETOPT, option, value, size) == _STAT_OK
        return _verify_with(lib, raw)
    finally:
        _LIB.dkim_close(lib)


def _verify_with(lib: int, raw: bytes) -> list[Verdict]:
    assert _LIB is not None
    status = ctypes.c_int()
    handle = _LIB.dkim_verify(lib, b"mailer-test", None, ctypes.byref(status))
    assert handle, _LIB.dkim_getresultstr(status.value)
    try:
        for chunk in (raw, None):
            stat = _LIB.dkim_chunk(handle, chunk, 0 if chunk is None else len(chunk))
            if stat == _STAT_NOSIG:
                return []
            assert stat == _STAT_OK, _LIB.dkim_getresultstr(stat)
        _LIB.dkim_eom(handle, None)  # its overall status is read per signature below
        sigs = ctypes.POINTER(ctypes.c_void_p)()
        count = ctypes.c_int()
        assert _LIB.dkim_getsiglist(handle, ctypes.byref(sigs), ctypes.byref(count)) == _STAT_OK
        verdicts = []
        for k in range(count.value):
            sig = sigs[k]
            algorithm = ctypes.c_int(-1)
            _LIB.dkim_sig_getsignalg(sig, ctypes.byref(algorithm))
            error = _LIB.dkim_sig_geterrorstr(_LIB.dkim_sig_geterror(sig)) or b""
            verdicts.append(
                Verdict(
                    selector=(_LIB.dkim_sig_getselector(sig) or b"").decode(),
                    algorithm=_ALGORITHMS.get(algorithm.value, str(algorithm.value)),
                    verified=bool(_LIB.dkim_sig_getflags(sig) & _SIGFLAG_PASSED)
                    and _LIB.dkim_sig_getbh(sig) == _SIGBH_MATCH,
                    error=error.decode(),
                )
            )
        return verdicts
    finally:
        _LIB.dkim_free(handle)
