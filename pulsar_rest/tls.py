"""The server's TLS context, from PEM files or a PKCS#12 bundle, with a passphrase file."""

from __future__ import annotations

import secrets
import ssl
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from pulsar_rest.settings import Settings

_MIN_VERSION = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSError(ValueError):
    """The TLS files cannot be used: the message is one line for the user."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _passphrase(settings: Settings) -> bytes | None:
    if settings.ssl_passphrase is None:
        return None
    # A file written by an editor or `echo` ends with a newline that is not part of it.
    return _read(settings.ssl_passphrase, "--ssl-passphrase").rstrip(b"\r\n")


def _no_prompt() -> bytes:
    # Without a callback, OpenSSL would prompt on the terminal for an encrypted key.
    raise TLSError("the private key is encrypted: give its passphrase with --ssl-passphrase")


def server_context(settings: Settings) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _MIN_VERSION[settings.ssl_min_version]
    passphrase = _passphrase(settings)
    if settings.ssl_pfx is not None:
        _load_pfx(ctx, settings.ssl_pfx, passphrase)
    else:
        assert settings.ssl_key is not None and settings.ssl_cert is not None
        for path, what in ((settings.ssl_key, "--ssl-key"), (settings.ssl_cert, "--ssl-cert")):
            _read(path, what)  # a clear error for a missing or unreadable file
        try:
            ctx.load_cert_chain(
                settings.ssl_cert, settings.ssl_key, password=_no_prompt if passphrase is None else passphrase
            )
        except ssl.SSLError as exc:
            raise TLSError(
                f"--ssl-key/--ssl-cert: cannot load them ({exc.reason or exc}): a wrong "
                "passphrase, a key that does not match the certificate, or not PEM files"
            ) from None
        except TLSError:
            raise  # from our passphrase callback: already the message to show
        except ValueError:  # OpenSSL takes 1,024 bytes of passphrase at most
            raise TLSError(
                "--ssl-passphrase: longer than a passphrase can be (1,024 bytes): is it the right file?"
            ) from None
    return ctx


def _load_pfx(ctx: ssl.SSLContext, path: Path, passphrase: bytes | None) -> None:
    data = _read(path, "--ssl-pfx")  # outside the try: TLSError is a ValueError too
    try:
        key, cert, chain = pkcs12.load_key_and_certificates(data, passphrase)
    except ValueError:
        raise TLSError(
            f"--ssl-pfx {path}: cannot open it: a wrong or missing passphrase, or not PKCS#12"
        ) from None
    if key is None or cert is None:
        raise TLSError(f"--ssl-pfx {path}: it must hold a private key and its certificate")
    # The ssl module loads keys from files only. The key goes to a private temporary file,
    # encrypted with a one-time password, in a 0700 directory removed at once.
    password = secrets.token_bytes(32)
    with tempfile.TemporaryDirectory(prefix="pulsar-rest-tls-") as tmp:
        key_file, cert_file = Path(tmp, "key.pem"), Path(tmp, "cert.pem")
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(password),
            )
        )
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain))
        cert_file.write_bytes(pem)
        try:
            ctx.load_cert_chain(cert_file, key_file, password=password)
        except ssl.SSLError as exc:
            raise TLSError(f"--ssl-pfx {path}: cannot use it ({exc.reason or exc})") from None


# A certificate this close to its end is worth a warning at every start.
EXPIRY_WARNING = timedelta(days=14)


def expiry_warning(settings: Settings, now: datetime | None = None) -> str | None:
    """A warning if the server's certificate has expired or soon will (None otherwise).
    Clients refuse an expired certificate: better said by the server at start than found by
    each of them. Call it after server_context(), which has checked the files."""
    if settings.ssl_pfx is not None:
        _, cert, _ = pkcs12.load_key_and_certificates(
            _read(settings.ssl_pfx, "--ssl-pfx"), _passphrase(settings)
        )
        assert cert is not None
    else:
        assert settings.ssl_cert is not None
        cert = x509.load_pem_x509_certificate(_read(settings.ssl_cert, "--ssl-cert"))
    end = cert.not_valid_after_utc
    now = now or datetime.now(UTC)
    if end <= now:
        return f"the TLS certificate expired on {end:%Y-%m-%d %H:%M} UTC: clients will refuse it"
    if end - now <= EXPIRY_WARNING:
        return f"the TLS certificate expires on {end:%Y-%m-%d %H:%M} UTC, in {(end - now).days} days"
    return None
