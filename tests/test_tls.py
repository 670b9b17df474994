"""TLS end to end: the production context and app behind a real TLS listener, real TLS clients."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import ssl
import stat
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pulsar_rest.settings import Settings
from pulsar_rest.tls import TLSError, expiry_warning, server_context
from pulsar_rest.web.app import create_app

ROOT = Path(__file__).parents[1]
MAKE_DEV_CERT = ROOT / "scripts" / "make-dev-cert"


@dataclass(frozen=True)
class DevCert:
    directory: Path

    @property
    def key(self) -> Path:
        return self.directory / "pulsar.local.key"

    @property
    def crt(self) -> Path:
        return self.directory / "pulsar.local.crt"

    @property
    def pfx(self) -> Path:
        return self.directory / "pulsar.local.pfx"

    @property
    def passphrase(self) -> Path:
        return self.directory / "pulsar.local.passphrase"


@pytest.fixture(scope="session")
def dev_cert(tmp_path_factory: pytest.TempPathFactory) -> DevCert:
    """The files of scripts/make-dev-cert, made once by running it as the README says."""
    directory = tmp_path_factory.mktemp("ssl")
    done = subprocess.run(
        [sys.executable, str(MAKE_DEV_CERT), str(directory)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return DevCert(directory)


@pytest.fixture
def settings(pulsar_bin: str, tmp_path: Path) -> Settings:
    """No TLS yet: each test adds its files (this overrides conftest's `settings`)."""
    return Settings(pulsar_bin=pulsar_bin, kill_grace=0.5, long_poll_timeout=5, data_dir=tmp_path / "data")


def with_tls(base: Settings, **tls: Any) -> Settings:
    return dataclasses.replace(base, **tls)


@asynccontextmanager
async def serving(settings: Settings, ctx: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """The app served as `pulsar-rest` serves it, on a free port of 127.0.0.1 (yielded)."""
    ctx = server_context(settings) if ctx is None else ctx
    runner = web.AppRunner(create_app(settings), handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        port: int = runner.addresses[0][1]
        yield port
    finally:
        await runner.cleanup()


@contextmanager
def old_tls_allowed() -> Iterator[None]:
    # Setting TLS 1.0/1.1 as a bound warns (DeprecationWarning) and warnings are errors here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def client_context(
    cafile: Path,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
    legacy: bool = False,
) -> ssl.SSLContext:
    """A verifying client: trusts only `cafile`, checks the host name."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    with old_tls_allowed():
        if minimum is not None:
            ctx.minimum_version = minimum
        if maximum is not None:
            ctx.maximum_version = maximum
    if legacy:
        # OpenSSL 3 refuses TLS 1.0/1.1 (SHA-1 handshake signatures) above security level 0.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


async def get_tasks(port: int, ctx: ssl.SSLContext) -> dict[str, Any]:
    """GET /tasks over TLS, checking the certificate for the name `localhost`."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"https://127.0.0.1:{port}/tasks", ssl=ctx, server_hostname="localhost") as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == "application/json"
        body: dict[str, Any] = await resp.json()
    return body


async def handshake(port: int, ctx: ssl.SSLContext) -> str:
    """A bare TLS handshake: the protocol version agreed (a refusal raises)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    try:
        version = writer.get_extra_info("ssl_object").version()
        assert isinstance(version, str)
        return version
    finally:
        writer.close()
        await writer.wait_closed()


async def assert_refused(port: int, ctx: ssl.SSLContext) -> None:
    """The server ends the handshake. asyncio's TLS server closes the connection without
    sending its alert (the client sees EOF: a reset); were the alert sent, it would be
    `protocol version`. Either way the peer refused: a client-side failure is another error."""
    with pytest.raises((ConnectionResetError, ssl.SSLError)) as caught:
        await handshake(port, ctx)
    if isinstance(caught.value, ssl.SSLError):
        assert "PROTOCOL_VERSION" in str(caught.value)


# --- the script's files ---


def test_make_dev_cert_files(dev_cert: DevCert) -> None:
    assert stat.S_IMODE(dev_cert.key.stat().st_mode) == 0o600
    assert dev_cert.passphrase.read_text() == "pulsar-dev\n"
    key_pem = dev_cert.key.read_bytes()
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, not encrypted
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)

    cert = x509.load_pem_x509_certificate(dev_cert.crt.read_bytes())
    assert cert.issuer == cert.subject  # self-signed
    assert cert.public_key() == key.public_key()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"*.pulsar.local", "pulsar.local", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    valid = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=3650) <= valid <= datetime.timedelta(days=3660)

    passphrase = dev_cert.passphrase.read_bytes().strip()
    pfx_key, pfx_cert, _ = pkcs12.load_key_and_certificates(dev_cert.pfx.read_bytes(), passphrase)
    assert pfx_cert == cert
    assert pfx_key is not None and pfx_key.public_key() == key.public_key()
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(dev_cert.pfx.read_bytes(), None)  # encrypted


def test_repository_dev_cert_loads() -> None:
    """The files in bin/ssl, used as bin/ssl/README.md says, make a server context."""
    ssl_dir = ROOT / "bin" / "ssl"
    pem = Settings(ssl_key=ssl_dir / "pulsar.local.key", ssl_cert=ssl_dir / "pulsar.local.crt")
    pfx = Settings(ssl_pfx=ssl_dir / "pulsar.local.pfx", ssl_passphrase=ssl_dir / "pulsar.local.passphrase")
    for settings in (pem, pfx):
        assert server_context(settings).minimum_version == ssl.TLSVersion.TLSv1_2


# --- serving ---


async def test_key_and_cert(settings: Settings, dev_cert: DevCert) -> None:
    tls = with_tls(settings, ssl_key=dev_cert.key, ssl_cert=dev_cert.crt)
    async with serving(tls) as port:
        body = await get_tasks(port, client_context(dev_cert.crt))
    empty = {"total": 0, "page": 1, "pageSize": 50, "pages": 0, "ids": [], "tasks": {}}
    assert body == {"url": f"https://127.0.0.1:{port}/", **empty}


async def test_pfx_and_passphrase(settings: Settings, dev_cert: DevCert) -> None:
    tls = with_tls(settings, ssl_pfx=dev_cert.pfx, ssl_passphrase=dev_cert.passphrase)
    async with serving(tls) as port:
        body = await get_tasks(port, client_context(dev_cert.crt))
    assert body["url"] == f"https://127.0.0.1:{port}/"


async def test_client_refuses_a_certificate_it_does_not_trust(
    settings: Settings, dev_cert: DevCert, tmp_path: Path
) -> None:
    """The control for the tests above: the client really verifies what the server sends."""
    other = make_ca("Other CA")
    other_file = tmp_path / "other.crt"
    other_file.write_bytes(pem(other.cert))
    tls = with_tls(settings, ssl_key=dev_cert.key, ssl_cert=dev_cert.crt)
    async with serving(tls) as port:
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(port, client_context(other_file))


async def test_encrypted_key_with_passphrase_file(
    settings: Settings, dev_cert: DevCert, tmp_path: Path
) -> None:
    key = serialization.load_pem_private_key(dev_cert.key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    assert b"ENCRYPTED PRIVATE KEY" in encrypted.read_bytes()
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("s3cret\n")  # the newline is not part of it
    tls = with_tls(settings, ssl_key=encrypted, ssl_cert=dev_cert.crt, ssl_passphrase=passphrase)
    async with serving(tls) as port:
        body = await get_tasks(port, client_context(dev_cert.crt))
    assert body["tasks"] == {}

    # Without the passphrase: our callback's message, so OpenSSL never got to prompt on the
    # terminal (its own prompt would block or fail with another error).
    with pytest.raises(
        TLSError, match=r"^the private key is encrypted: give its passphrase with --ssl-passphrase$"
    ):
        server_context(with_tls(settings, ssl_key=encrypted, ssl_cert=dev_cert.crt))

    # A wrong passphrase, or an empty file (given, so not "give its passphrase"), is wrong.
    for text in ("not it\n", ""):
        wrong = tmp_path / "wrong"
        wrong.write_text(text)
        with pytest.raises(TLSError, match=r"--ssl-key/--ssl-cert: cannot load them .*wrong passphrase"):
            server_context(with_tls(settings, ssl_key=encrypted, ssl_cert=dev_cert.crt, ssl_passphrase=wrong))


@pytest.mark.parametrize("passphrase", ["wrong", "none"])
def test_pfx_wrong_or_missing_passphrase(
    settings: Settings, dev_cert: DevCert, tmp_path: Path, passphrase: str
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-pulsar-dev\n")
    tls = with_tls(settings, ssl_pfx=dev_cert.pfx, ssl_passphrase=wrong if passphrase == "wrong" else None)
    with pytest.raises(
        TLSError, match=f"^--ssl-pfx {dev_cert.pfx}: cannot open it: a wrong or missing passphrase"
    ):
        server_context(tls)


# --- a certificate chain ---


@dataclass(frozen=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _issue(
    subject: str, issuer: Issued | None, ca: bool, names: list[x509.GeneralName] | None = None
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    signer = key if issuer is None else issuer.key
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if issuer is None else issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(names or []), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return Issued(key, builder.sign(signer, hashes.SHA256()))


def make_ca(name: str, issuer: Issued | None = None) -> Issued:
    return _issue(name, issuer, ca=True)


@dataclass(frozen=True)
class Chain:
    """root -> intermediate -> leaf for `localhost`, and a client trusting only the root."""

    root: Issued
    intermediate: Issued
    leaf: Issued
    client: ssl.SSLContext


@pytest.fixture
def chain(tmp_path: Path) -> Chain:
    root = make_ca("Test Root CA")
    intermediate = make_ca("Test Intermediate CA", root)
    leaf = _issue("localhost", intermediate, ca=False, names=[x509.DNSName("localhost")])
    root_file = tmp_path / "root.crt"
    root_file.write_bytes(pem(root.cert))
    return Chain(root, intermediate, leaf, client_context(root_file))


# The client can verify the leaf only if the server also sends the intermediate.


async def test_certificate_file_with_ca_chain(settings: Settings, chain: Chain, tmp_path: Path) -> None:
    key_file = tmp_path / "leaf.key"
    key_file.write_bytes(
        chain.leaf.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    chain_file, leaf_only = tmp_path / "chain.crt", tmp_path / "leaf.crt"
    chain_file.write_bytes(pem(chain.leaf.cert) + pem(chain.intermediate.cert))
    leaf_only.write_bytes(pem(chain.leaf.cert))

    async with serving(with_tls(settings, ssl_key=key_file, ssl_cert=chain_file)) as port:
        body = await get_tasks(port, chain.client)
        assert body["tasks"] == {}
    # The control: the same leaf without its chain cannot be verified by the same client.
    async with serving(with_tls(settings, ssl_key=key_file, ssl_cert=leaf_only)) as port:
        with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer certificate"):
            await handshake(port, chain.client)


async def test_pfx_with_ca_chain(settings: Settings, chain: Chain, tmp_path: Path) -> None:
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("s3cret\n")
    pfx = tmp_path / "chain.pfx"
    pfx.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"localhost",
            chain.leaf.key,
            chain.leaf.cert,
            [chain.intermediate.cert],
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    async with serving(with_tls(settings, ssl_pfx=pfx, ssl_passphrase=passphrase)) as port:
        body = await get_tasks(port, chain.client)
    assert body["tasks"] == {}


# --- protocol versions ---


async def test_tls_1_1_client_is_refused(settings: Settings, dev_cert: DevCert) -> None:
    with old_tls_allowed():
        tls_1_1 = ssl.TLSVersion.TLSv1_1
    # Both clients accept TLS 1.1 at security level 0; one of them also TLS 1.2.
    only_1_1 = client_context(dev_cert.crt, minimum=tls_1_1, maximum=tls_1_1, legacy=True)
    up_to_1_2 = client_context(dev_cert.crt, minimum=tls_1_1, maximum=ssl.TLSVersion.TLSv1_2, legacy=True)
    tls = with_tls(settings, ssl_key=dev_cert.key, ssl_cert=dev_cert.crt)
    production = server_context(tls)
    assert production.minimum_version == ssl.TLSVersion.TLSv1_2

    # The control: the same server context with its floor lowered to TLS 1.1 (and OpenSSL's
    # security level to 0, as TLS 1.1 needs) accepts the TLS 1.1 client: this OpenSSL and
    # this client can speak TLS 1.1, so the refusal below is the production settings'.
    permissive = server_context(tls)
    with old_tls_allowed():
        permissive.minimum_version = tls_1_1
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        async with serving(tls, permissive) as port:
            control = await handshake(port, only_1_1)
    except ssl.SSLError:
        # This OpenSSL cannot do TLS 1.1 at all: a refusal would prove nothing, so the
        # server context's floor (asserted above) is all that can be checked here.
        pytest.skip("this OpenSSL cannot negotiate TLS 1.1 even with a permissive server")
    assert control == "TLSv1.1"

    async with serving(tls, production) as port:
        await assert_refused(port, only_1_1)
        assert await handshake(port, up_to_1_2) == "TLSv1.2"
        assert (await get_tasks(port, up_to_1_2))["tasks"] == {}


async def test_min_version_1_3(settings: Settings, dev_cert: DevCert) -> None:
    tls_1_2 = client_context(dev_cert.crt, maximum=ssl.TLSVersion.TLSv1_2)
    tls_1_3 = client_context(dev_cert.crt, minimum=ssl.TLSVersion.TLSv1_3)
    tls = with_tls(settings, ssl_key=dev_cert.key, ssl_cert=dev_cert.crt)
    # The control: the TLS 1.2 client is welcome with the default floor.
    async with serving(tls) as port:
        assert await handshake(port, tls_1_2) == "TLSv1.2"

    strict = with_tls(settings, ssl_key=dev_cert.key, ssl_cert=dev_cert.crt, ssl_min_version="1.3")
    assert server_context(strict).minimum_version == ssl.TLSVersion.TLSv1_3
    async with serving(strict) as port:
        await assert_refused(port, tls_1_2)
        assert await handshake(port, tls_1_3) == "TLSv1.3"
        assert (await get_tasks(port, tls_1_3))["tasks"] == {}


# --- unusable files ---


@pytest.mark.parametrize("flag", ["--ssl-key", "--ssl-cert", "--ssl-pfx", "--ssl-passphrase"])
def test_missing_file_names_flag_and_file(
    settings: Settings, dev_cert: DevCert, tmp_path: Path, flag: str
) -> None:
    missing = tmp_path / "missing.pem"
    files: dict[str, Path] = {"ssl_key": dev_cert.key, "ssl_cert": dev_cert.crt}
    if flag in ("--ssl-pfx", "--ssl-passphrase"):
        files = {"ssl_pfx": dev_cert.pfx, "ssl_passphrase": dev_cert.passphrase}
    files[flag[2:].replace("-", "_")] = missing
    with pytest.raises(TLSError) as caught:
        server_context(with_tls(settings, **files))
    assert str(caught.value) == f"cannot read {flag} {missing}: No such file or directory"


def test_key_that_does_not_match_the_certificate(
    settings: Settings, dev_cert: DevCert, tmp_path: Path
) -> None:
    other = tmp_path / "other.key"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(TLSError, match="does not match the certificate"):
        server_context(with_tls(settings, ssl_key=other, ssl_cert=dev_cert.crt))


@pytest.mark.parametrize("form", ["pem", "pfx"])
def test_a_certificate_near_or_past_its_end_is_said_at_start(
    settings: Settings, dev_cert: DevCert, form: str
) -> None:
    if form == "pem":
        tls = with_tls(settings, ssl_key=dev_cert.key, ssl_cert=dev_cert.crt)
    else:
        tls = with_tls(settings, ssl_pfx=dev_cert.pfx, ssl_passphrase=dev_cert.passphrase)
    end = x509.load_pem_x509_certificate(dev_cert.crt.read_bytes()).not_valid_after_utc
    assert expiry_warning(tls) is None  # the development certificate is good for a while
    soon = expiry_warning(tls, now=end - datetime.timedelta(days=3, hours=1))
    assert soon == f"the TLS certificate expires on {end:%Y-%m-%d %H:%M} UTC, in 3 days"
    past = expiry_warning(tls, now=end + datetime.timedelta(seconds=1))
    assert past == f"the TLS certificate expired on {end:%Y-%m-%d %H:%M} UTC: clients will refuse it"
