"""Encryption at rest, blind indexes and signed links.

- `KeyRing`: AES-256-GCM with key ids, so keys rotate without downtime: the active key
  encrypts, every key still in the ring decrypts.
- `BlindIndex`: a keyed hash (HMAC-SHA256) of a normalised identifier, for look-ups that
  never need the plaintext.
- `Signer`: HMAC-signed, expiring tokens for the links mailed to people.
- `encrypt_file` / `decrypt_file`: chunked AES-GCM for archives, so an export of any size
  is encrypted and served without being held in memory.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline.errors import ConfigurationError, PermanentError

_FORMAT = b"A1"
_CHUNK = 64 * 1024


class DecryptionFailed(PermanentError):
    """Ciphertext was altered, truncated, or made with a key the ring no longer has."""


def b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class KeyRing:
    """Data keys by id; `active` names the one new ciphertexts use."""

    def __init__(self, keys: Mapping[str, bytes], active: str):
        if active not in keys:
            raise ConfigurationError(f"active key {active!r} is not in the key ring")
        for kid, key in keys.items():
            if len(key) != 32:
                raise ConfigurationError(f"key {kid!r} must be 32 bytes, got {len(key)}")
            if not kid.isascii() or not 0 < len(kid) < 64 or ":" in kid:
                raise ConfigurationError(f"key id {kid!r} must be short ASCII without ':'")
        self._keys = dict(keys)
        self.active = active

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    @property
    def keys(self) -> dict[str, bytes]:
        """A copy of the key material, for writing a rotated keys file."""
        return dict(self._keys)

    def key_id_of(self, blob: bytes) -> str:
        """The id of the key a ciphertext was made with (for rotation)."""
        return self._split(blob)[0]

    def encrypt(self, plaintext: bytes, *, context: bytes = b"") -> bytes:
        kid = self.active.encode()
        nonce = os.urandom(12)
        sealed = AESGCM(self._keys[self.active]).encrypt(nonce, plaintext, _FORMAT + kid + context)
        return _FORMAT + bytes([len(kid)]) + kid + nonce + sealed

    def decrypt(self, blob: bytes, *, context: bytes = b"") -> bytes:
        kid, nonce, sealed = self._split(blob)
        key = self._keys.get(kid)
        if key is None:
            raise DecryptionFailed(f"no key {kid!r} in the ring")
        try:
            return AESGCM(key).decrypt(nonce, sealed, _FORMAT + kid.encode() + context)
        except InvalidTag as exc:
            raise DecryptionFailed("ciphertext failed authentication") from exc

    def encrypt_json(self, value: object, *, context: bytes = b"") -> bytes:
        return self.encrypt(json.dumps(value, sort_keys=True).encode(), context=context)

    def decrypt_json(self, blob: bytes, *, context: bytes = b"") -> object:
        return json.loads(self.decrypt(blob, context=context))

    @staticmethod
    def _split(blob: bytes) -> tuple[str, bytes, bytes]:
        if len(blob) < 4 or blob[:2] != _FORMAT:
            raise DecryptionFailed("not a ciphertext of this key ring")
        n = blob[2]
        kid = blob[3 : 3 + n].decode("ascii", "replace")
        nonce = blob[3 + n : 15 + n]
        return kid, nonce, blob[15 + n :]

    # -- streaming, for archives -------------------------------------------------------

    def writer(self, dest: BinaryIO) -> EncryptingWriter:
        """A file-like object that encrypts what is written to it into `dest`."""
        return EncryptingWriter(self.active, self._keys[self.active], dest)

    def encrypt_file(self, chunks: Iterable[bytes], dest: BinaryIO) -> None:
        writer = self.writer(dest)
        for chunk in chunks:
            writer.write(chunk)
        writer.close()

    @staticmethod
    def stream_key_id(src: BinaryIO) -> str:
        """Read an encrypted stream's header: the id of the key it was made with."""
        head = src.read(3)
        if len(head) < 3 or head[:2] != _FORMAT:
            raise DecryptionFailed("not an archive of this key ring")
        return src.read(head[2]).decode("ascii", "replace")

    def decrypt_file(self, src: BinaryIO) -> Iterator[bytes]:
        kid = self.stream_key_id(src)
        key = self._keys.get(kid)
        if key is None:
            raise DecryptionFailed(f"no key {kid!r} in the ring")
        prefix = src.read(7)
        aead = AESGCM(key)
        counter = 0
        while True:
            size_raw = src.read(4)
            if len(size_raw) < 4:
                raise DecryptionFailed("archive is truncated")
            (size,) = struct.unpack(">I", size_raw)
            frame = src.read(size)
            for last in (False, True):
                nonce = prefix + struct.pack(">I", counter) + (b"\x01" if last else b"\x00")
                try:
                    plain = aead.decrypt(nonce, frame, None)
                except InvalidTag:
                    continue
                yield plain
                if last:
                    return
                break
            else:
                raise DecryptionFailed("archive frame failed authentication")
            counter += 1


class EncryptingWriter:
    """Streams plaintext into sealed 64 KiB frames.

    Each frame's nonce is a random prefix plus its counter, and the last frame is
    marked, so frames cannot be reordered, dropped or cut off unnoticed. `tell` reports
    the plaintext position and `seek` is refused, so `zipfile` writes through it as a
    non-seekable stream.
    """

    def __init__(self, kid: str, key: bytes, dest: BinaryIO):
        self._aead = AESGCM(key)
        self._prefix = os.urandom(7)
        self._dest = dest
        self._buf = bytearray()
        self._counter = 0
        self._position = 0
        self.closed = False
        raw_kid = kid.encode()
        dest.write(_FORMAT + bytes([len(raw_kid)]) + raw_kid + self._prefix)

    def write(self, data: bytes) -> int:
        self._buf += data
        self._position += len(data)
        while len(self._buf) > _CHUNK:  # keep at least one byte back for the last frame
            self._dest.write(
                _seal_frame(
                    self._aead, self._prefix, self._counter, bytes(self._buf[:_CHUNK]), last=False
                )
            )
            del self._buf[:_CHUNK]
            self._counter += 1
        return len(data)

    def tell(self) -> int:
        return self._position

    def seek(self, *_args: object) -> int:
        raise OSError("an encrypted stream cannot seek")

    def flush(self) -> None:
        self._dest.flush()

    def close(self) -> None:
        if not self.closed:
            self._dest.write(
                _seal_frame(self._aead, self._prefix, self._counter, bytes(self._buf), last=True)
            )
            self._buf.clear()
            self.closed = True
            self._dest.flush()


def _seal_frame(aead: AESGCM, prefix: bytes, counter: int, plain: bytes, *, last: bool) -> bytes:
    nonce = prefix + struct.pack(">I", counter) + (b"\x01" if last else b"\x00")
    sealed = aead.encrypt(nonce, plain, None)
    return struct.pack(">I", len(sealed)) + sealed


class BlindIndex:
    """Keyed hash of an identifier: equal inputs match, nothing can be read back."""

    def __init__(self, key: bytes):
        self._key = key

    def email(self, email: str) -> str:
        return self.of("email", email.strip().casefold())

    def of(self, kind: str, value: str) -> str:
        return hmac.new(self._key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


class BadSignature(PermanentError):
    """A token was altered, made with another key, or is malformed."""


class Expired(PermanentError):
    """A token is authentic but its time is up."""


class Signer:
    """Signs small payloads into URL-safe, expiring tokens (`payload.expiry.mac`)."""

    def __init__(self, key: bytes, *, purpose: str):
        self._key = key
        self._purpose = purpose.encode()

    def sign(self, payload: str, *, ttl_seconds: int, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + ttl_seconds)
        body = f"{b64e(payload.encode())}.{expires}"
        return f"{body}.{self._mac(body)}"

    def unsign(self, token: str, *, now: float | None = None) -> str:
        try:
            encoded, expires_raw, mac = token.split(".")
            expires = int(expires_raw)
        except ValueError as exc:
            raise BadSignature("malformed token") from exc
        if not hmac.compare_digest(mac, self._mac(f"{encoded}.{expires_raw}")):
            raise BadSignature("token signature does not match")
        if (time.time() if now is None else now) > expires:
            raise Expired("token has expired")
        return b64d(encoded).decode()

    def _mac(self, body: str) -> str:
        return b64e(
            hmac.new(self._key, self._purpose + b"|" + body.encode(), hashlib.sha256).digest()
        )


@dataclass(frozen=True)
class Keys:
    """Every secret the pipeline uses, loaded once."""

    ring: KeyRing
    index_key: bytes
    signing_key: bytes
    intake_keys: Mapping[str, bytes]  # intake system name -> HMAC key for assertions
    demo: bool

    def blind_index(self) -> BlindIndex:
        return BlindIndex(self.index_key)

    def signer(self, purpose: str) -> Signer:
        return Signer(self.signing_key, purpose=purpose)

    def to_json(self) -> dict[str, object]:
        return {
            "demo": self.demo,
            "active": self.ring.active,
            "data_keys": {kid: b64e(key) for kid, key in self.ring.keys.items()},
            "index_key": b64e(self.index_key),
            "signing_key": b64e(self.signing_key),
            "intake_keys": {name: b64e(key) for name, key in self.intake_keys.items()},
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> Keys:
        try:
            data_keys = {k: b64d(str(v)) for k, v in dict(raw["data_keys"]).items()}  # type: ignore[call-overload]
            return cls(
                ring=KeyRing(data_keys, str(raw["active"])),
                index_key=b64d(str(raw["index_key"])),
                signing_key=b64d(str(raw["signing_key"])),
                intake_keys={k: b64d(str(v)) for k, v in dict(raw.get("intake_keys", {})).items()},  # type: ignore[call-overload]
                demo=bool(raw.get("demo", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"key material is incomplete or malformed: {exc}") from exc

    @classmethod
    def generate(cls, *, demo: bool) -> Keys:
        return cls(
            ring=KeyRing({"k1": os.urandom(32)}, "k1"),
            index_key=os.urandom(32),
            signing_key=os.urandom(32),
            intake_keys={"allego-app": os.urandom(32)},
            demo=demo,
        )


def keys_file_of(
    *, keys_file: Path | None, keys_env: Mapping[str, str], data_dir: Path, production: bool
) -> Path | None:
    """The file keys come from (the one a rotation edits), or None when they come from
    the environment."""
    if keys_env.get("PRIVACY_KEYS_JSON"):
        return None
    if keys_file is not None:
        return keys_file
    return None if production else data_dir / "keys.json"


def write_keys_file(path: Path, keys: Keys) -> None:
    """Replace a keys file atomically (readers see the old or the new, never half)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    tmp.write_text(json.dumps(keys.to_json(), indent=2))
    tmp.chmod(0o600)
    os.replace(tmp, path)


class KeySource:
    """Keys loaded once, and again whenever their file changes, so that a rotation done by
    `privacy keys rotate` reaches running workers without a restart."""

    def __init__(self, load: Callable[[], Keys], path: Path | None):
        self._load = load
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._keys: Keys | None = None
        self._lock = threading.Lock()

    def _file_stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def current(self) -> Keys:
        stamp = self._file_stamp()
        if self._keys is None or stamp != self._stamp:
            with self._lock:
                if self._keys is None or stamp != self._stamp:
                    self._keys = self._load()
                    self._stamp = self._file_stamp()
        return self._keys


def load_keys(
    *, keys_file: Path | None, keys_env: Mapping[str, str], data_dir: Path, production: bool
) -> Keys:
    """Key material from PRIVACY_KEYS_JSON, a keys file, or (demo only) a generated file.

    Production refuses generated demo keys: its secrets must come from the environment
    or a file an operator placed, never from the repository or a first run.
    """
    if keys_env.get("PRIVACY_KEYS_JSON"):
        keys = Keys.from_json(json.loads(keys_env["PRIVACY_KEYS_JSON"]))
    elif keys_file is not None:
        keys = Keys.from_json(json.loads(keys_file.read_text()))
    elif production:
        raise ConfigurationError(
            "production needs keys: set PRIVACY_KEYS_FILE or PRIVACY_KEYS_JSON "
            "(make them with `privacy keys generate`)"
        )
    else:
        path = data_dir / "keys.json"
        if path.exists():
            keys = Keys.from_json(json.loads(path.read_text()))
        else:
            keys = Keys.generate(demo=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".keys.{os.getpid()}.{os.urandom(4).hex()}.tmp")
            tmp.write_text(json.dumps(keys.to_json(), indent=2))
            tmp.chmod(0o600)
            with contextlib.suppress(FileExistsError):  # first writer wins
                os.link(tmp, path)
            tmp.unlink()
            keys = Keys.from_json(json.loads(path.read_text()))
    if production and keys.demo:
        raise ConfigurationError("refusing to start in production with demo keys")
    return keys
