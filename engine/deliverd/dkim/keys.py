"""DKIM private keys as ``dknewkey`` writes them, and the DNS record that publishes each one.

RSA keys are PEM (PKCS#1 or PKCS#8), Ed25519 keys the base64 of their 32-byte seed. A key that
cannot be read or parsed is a ``DkimKeyError`` naming the file and the reason, never the key's
bytes, so an error can be logged or shown as it is. The public half is derived here (RSA: the
SubjectPublicKeyInfo DER, as ``openssl rsa -pubout`` gives; Ed25519: the raw 32 bytes) for the
``p=`` tag of the TXT record.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field

from deliverd.config.model import DkimKey

RSA = "rsa-sha256"
ED25519 = "ed25519-sha256"
MIN_RSA_BITS = 1024  # what verifiers accept (RFC 8301); dknewkey makes 2048
_MAX_KEY_FILE = 64 * 1024
# rsaEncryption (1.2.840.113549.1.1.1) with NULL parameters, DER.
_RSA_ALGORITHM_ID = bytes.fromhex("300d06092a864886f70d0101010500")


class DkimKeyError(Exception):
    """A key file that cannot be used; the message names the file, never its content."""


@dataclass(frozen=True)
class SigningKey:
    entry: DkimKey
    private: bytes = field(repr=False)  # what dkimpy signs with: PEM, or the base64 seed
    # p= before base64: SubjectPublicKeyInfo DER (RSA) or the raw 32 bytes (Ed25519)
    public: bytes = field(repr=False)

    @property
    def record_name(self) -> str:
        return f"{self.entry.selector}._domainkey.{self.entry.domain.rstrip('.')}"

    def txt_value(self) -> str:
        kind = "rsa" if self.entry.algorithm == RSA else "ed25519"
        return f"v=DKIM1; k={kind}; p={base64.b64encode(self.public).decode('ascii')}"

    def zone_line(self) -> str:
        """``selector._domainkey.domain. IN TXT "..."``, split in strings of at most 255."""
        value = self.txt_value()
        parts = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
        return f"{self.record_name}. IN TXT {parts}"


def load_key(entry: DkimKey) -> SigningKey:
    data = _read(entry.key_file)
    if entry.algorithm == ED25519:
        return SigningKey(entry, data.strip(), _ed25519_public(entry.key_file, data))
    return SigningKey(entry, data, _rsa_public(entry.key_file, data))


def _read(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise DkimKeyError(f"DKIM key {path}: cannot be read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        try:
            data = fh.read(_MAX_KEY_FILE + 1)
        except OSError as exc:
            raise DkimKeyError(f"DKIM key {path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > _MAX_KEY_FILE:
        raise DkimKeyError(f"DKIM key {path}: too large to be a key")
    return data


def _ed25519_public(path: str, data: bytes) -> bytes:
    import nacl.exceptions
    import nacl.signing

    try:
        seed = base64.b64decode(data.strip(), validate=True)
        return bytes(nacl.signing.SigningKey(seed).verify_key)
    except (binascii.Error, ValueError, nacl.exceptions.CryptoError):
        raise DkimKeyError(
            f"DKIM key {path}: not an Ed25519 key (base64 of a 32-byte seed, as dknewkey "
            "--ktype ed25519 writes)"
        ) from None


def _rsa_public(path: str, data: bytes) -> bytes:
    from dkim.crypto import UnparsableKeyError, parse_pem_private_key

    try:
        key = parse_pem_private_key(data)
    except (UnparsableKeyError, ValueError, TypeError, IndexError):
        # The library's message may quote parts of the key: it is not repeated.
        raise DkimKeyError(
            f"DKIM key {path}: not a PEM RSA private key (PKCS#1 or PKCS#8, as dknewkey "
            "writes)"
        ) from None
    modulus, exponent = int(key["modulus"]), int(key["publicExponent"])
    if modulus.bit_length() < MIN_RSA_BITS:
        raise DkimKeyError(
            f"DKIM key {path}: {modulus.bit_length()}-bit RSA key; verifiers refuse keys under "
            f"{MIN_RSA_BITS} bits (make a 2048-bit one with dknewkey)"
        )
    rsa_public = _der(0x30, _der_int(modulus) + _der_int(exponent))
    return _der(0x30, _RSA_ALGORITHM_ID + _der(0x03, b"\x00" + rsa_public))


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))
