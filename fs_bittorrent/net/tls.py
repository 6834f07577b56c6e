"""Per-run TLS identities for the data plane: mutual TLS 1.3, pinned certificates.

Why TLS 1.3 from Python's ``ssl`` (OpenSSL) and not something of our own:
it gives, from one well-kept implementation, everything the data plane
needs -- both ends authenticated by a signature over a transcript that
contains fresh randoms from both sides (nothing can be replayed on another
connection), ephemeral key exchange (forward secrecy), and authenticated
encryption of every byte after the handshake.  A Noise handshake would do
the same with fewer bytes, but needs a library outside the standard one and
asyncio glue of our own.

No certificate authority: each client draws a fresh ECDSA P-256 key and a
self-signed certificate when it starts (:class:`LocalIdentity`).  The
private key never leaves the process.  The certificate (public) travels
with the client's data-plane address in its ``bt_manifest``; the server
relays the table ``peer id -> (address, certificate)`` in ``bt_start``.  A
peer is then *pinned*: a connection is accepted only from the holder of the
key of the certificate the server published for the peer id it claims
(:func:`fingerprint`, SHA-256 of the DER certificate).

Python's ``ssl`` has no certificate-verify callback, so "accept exactly
these certificates" is expressed the way OpenSSL understands it: every
certificate of the table is loaded as a trust anchor (a self-signed
certificate anchors itself), with ``CERT_REQUIRED`` on both sides.  TLS
therefore refuses any certificate the server never published; the host then
checks that the certificate *matches the claimed peer id* (an anchor set
alone would let member A pose as member B).
"""
from __future__ import annotations

import datetime
import hashlib
import os
import secrets
import ssl
import tempfile
from dataclasses import dataclass, field
from typing import Iterable, Optional

__all__ = ["LocalIdentity", "TLS_PARAMETERS", "fingerprint", "peer_certificate",
           "load_certificate"]

#: What a conforming peer must speak (documented in README and design.md).
TLS_PARAMETERS = {
    "version": "TLS 1.3 only",
    "authentication": "mutual: both ends present a certificate (CERT_REQUIRED)",
    "certificate": "X.509 v3, self-signed, ECDSA P-256 with SHA-256",
    "server name": "none (no SNI, no host name check)",
    "session resumption": "off (no tickets, no 0-RTT)",
}

_VALIDITY = datetime.timedelta(days=30)
_CLOCK_SKEW = datetime.timedelta(hours=1)


def fingerprint(cert_der: bytes) -> str:
    """A certificate's pin: lowercase hex SHA-256 of its DER bytes (64 chars)."""
    return hashlib.sha256(cert_der).hexdigest()


def load_certificate(cert_der: bytes) -> bytes:
    """Check that ``cert_der`` parses as one X.509 certificate; return it.

    Raises ``ValueError`` naming the problem (the caller names the field)."""
    from cryptography import x509

    if not isinstance(cert_der, (bytes, bytearray)) or not cert_der:
        raise ValueError("empty certificate")
    x509.load_der_x509_certificate(bytes(cert_der))
    return bytes(cert_der)


def peer_certificate(ssl_object: Optional[ssl.SSLObject]) -> Optional[bytes]:
    """The DER certificate the other end presented, or None."""
    if ssl_object is None:
        return None
    return ssl_object.getpeercert(binary_form=True)


@dataclass
class LocalIdentity:
    """This process's key and self-signed certificate, and the TLS contexts
    built on them.  :meth:`trust` adds peers' certificates as anchors."""

    cert_der: bytes
    _key_pem: bytes = field(repr=False)
    server_context: ssl.SSLContext = field(init=False, repr=False)
    client_context: ssl.SSLContext = field(init=False, repr=False)
    trusted: set = field(init=False, default_factory=set)

    @classmethod
    def generate(cls) -> "LocalIdentity":
        """A fresh ECDSA P-256 key and a self-signed certificate for it.

        The subject (= issuer) name carries a random tag: OpenSSL finds a
        trust anchor by subject name, so every peer's name must differ."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                             f"fs_bittorrent peer {secrets.token_hex(8)}")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + _VALIDITY)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                    critical=False)
                .sign(key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cls(cert.public_bytes(serialization.Encoding.DER), key_pem)

    def __post_init__(self) -> None:
        self.server_context = self._context(server=True)
        self.client_context = self._context(server=False)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_der)

    def _context(self, server: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False          # identities are pinned, not named
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.options |= ssl.OP_NO_TICKET
        if server:
            ctx.num_tickets = 0             # no resumption: every connection is a full handshake
        # ``load_cert_chain`` only reads files: the key lives in a private
        # temporary directory for the call, then is removed.
        with tempfile.TemporaryDirectory(prefix="fsbt-tls-") as d:
            cert_path, key_path = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self._key_pem)
            with open(cert_path, "w") as f:
                f.write(ssl.DER_cert_to_PEM_cert(self.cert_der))
            ctx.load_cert_chain(cert_path, key_path)
        return ctx

    def trust(self, certs: Iterable[bytes]) -> int:
        """Accept these certificates in TLS from now on (both directions);
        returns how many were new.  Which *id* a certificate may claim is the
        host's check (:func:`fingerprint` against its pins)."""
        added = 0
        for der in certs:
            fp = fingerprint(der)
            if fp in self.trusted:
                continue
            for ctx in (self.server_context, self.client_context):
                ctx.load_verify_locations(cadata=bytes(der))
            self.trusted.add(fp)
            added += 1
        return added
