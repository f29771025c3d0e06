"""Encryption at rest (R30), blind indexes, signed links and key loading."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.crypto import (
    BadSignature,
    BlindIndex,
    DecryptionFailed,
    Expired,
    KeyRing,
    Keys,
    Signer,
    load_keys,
)
from pipeline.errors import ConfigurationError

K1, K2 = b"1" * 32, b"2" * 32
KIB = 1024


def ring(active: str = "k1", **extra: bytes) -> KeyRing:
    return KeyRing({"k1": K1, **extra}, active)


# -- KeyRing ---------------------------------------------------------------------------


def test_a_value_round_trips_through_the_key_ring():
    r = ring()
    blob = r.encrypt(b"dana.reyes@example.com", context=b"req-1")
    assert b"dana" not in blob
    assert r.decrypt(blob, context=b"req-1") == b"dana.reyes@example.com"


def test_json_round_trips_through_the_key_ring():
    r = ring()
    value = {"email": "dana@example.com", "ids": {"crm": "c1"}}
    assert r.decrypt_json(r.encrypt_json(value, context=b"x"), context=b"x") == value


def test_encrypting_twice_gives_different_ciphertexts():
    r = ring()
    assert r.encrypt(b"same") != r.encrypt(b"same")


def test_decrypting_with_the_wrong_context_fails():
    r = ring()
    blob = r.encrypt(b"secret", context=b"req-1")
    with pytest.raises(DecryptionFailed):
        r.decrypt(blob, context=b"req-2")


@pytest.mark.parametrize("position", [3, 5, 20, -1])
def test_a_tampered_ciphertext_fails(position):
    r = ring()
    blob = bytearray(r.encrypt(b"secret value", context=b"c"))
    blob[position] ^= 0x01
    with pytest.raises(DecryptionFailed):
        r.decrypt(bytes(blob), context=b"c")


@pytest.mark.parametrize("blob", [b"", b"A1", b"XX\x02k1" + b"\x00" * 40, b"not a ciphertext"])
def test_garbage_is_not_a_ciphertext(blob):
    with pytest.raises(DecryptionFailed):
        ring().decrypt(blob)


def test_rotation_keeps_old_ciphertexts_readable_and_new_ones_use_the_new_key():
    old_ring = ring()
    old = old_ring.encrypt(b"before rotation", context=b"c")
    rotated = KeyRing({"k1": K1, "k2": K2}, "k2")
    new = rotated.encrypt(b"after rotation", context=b"c")
    assert rotated.key_id_of(old) == "k1"
    assert rotated.key_id_of(new) == "k2"
    assert rotated.decrypt(old, context=b"c") == b"before rotation"
    assert rotated.decrypt(new, context=b"c") == b"after rotation"
    with pytest.raises(DecryptionFailed, match="k2"):
        old_ring.decrypt(new, context=b"c")  # a worker not yet rotated cannot read it


def test_a_key_removed_from_the_ring_can_no_longer_decrypt():
    blob = ring().encrypt(b"x")
    with pytest.raises(DecryptionFailed, match="no key"):
        KeyRing({"k2": K2}, "k2").decrypt(blob)


def test_a_key_ring_refuses_bad_configuration_with_a_helpful_message():
    with pytest.raises(ConfigurationError, match="active key 'k9' is not in the key ring"):
        KeyRing({"k1": K1}, "k9")
    with pytest.raises(ConfigurationError, match="must be 32 bytes, got 16"):
        KeyRing({"k1": b"x" * 16}, "k1")
    with pytest.raises(ConfigurationError, match="short ASCII without ':'"):
        KeyRing({"k:1": K1}, "k:1")


# -- streaming ---------------------------------------------------------------------------


def encrypted(r: KeyRing, plain: bytes, piece: int = 10_000) -> bytes:
    out = io.BytesIO()
    r.encrypt_file((plain[i : i + piece] for i in range(0, len(plain), piece)), out)
    return out.getvalue()


def decrypted(r: KeyRing, blob: bytes) -> bytes:
    return b"".join(r.decrypt_file(io.BytesIO(blob)))


def frames(blob: bytes, kid: str = "k1") -> tuple[bytes, list[bytes]]:
    """Split a stream into its header and its length-prefixed frames."""
    head_len = 3 + len(kid) + 7
    head, rest, parts = blob[:head_len], blob[head_len:], []
    while rest:
        (size,) = struct.unpack(">I", rest[:4])
        parts.append(rest[: 4 + size])
        rest = rest[4 + size :]
    return head, parts


@pytest.mark.parametrize(
    "size", [0, 1, 64 * KIB - 1, 64 * KIB, 64 * KIB + 1, 300 * KIB], ids=lambda n: f"{n}B"
)
def test_a_stream_round_trips_at_frame_boundaries(size):
    r = ring()
    plain = bytes(range(256)) * (size // 256) + bytes(size % 256)
    blob = encrypted(r, plain)
    assert decrypted(r, blob) == plain
    assert len(frames(blob)[1]) == max(1, -(-size // (64 * KIB)))


@given(st.integers(min_value=0, max_value=200 * KIB), st.integers(min_value=1, max_value=90_000))
@settings(max_examples=25, deadline=None)
def test_a_stream_of_any_size_written_in_any_pieces_round_trips(size, piece):
    r = ring()
    plain = (b"allego" * (size // 6 + 1))[:size]
    assert decrypted(r, encrypted(r, plain, piece)) == plain


def test_the_writer_reports_the_plaintext_position_and_refuses_to_seek():
    writer = ring().writer(io.BytesIO())
    writer.write(b"x" * 70_000)
    assert writer.tell() == 70_000
    with pytest.raises(OSError):
        writer.seek(0)


def test_a_stream_survives_rotation():
    blob = encrypted(ring(), b"archive" * 20_000)
    assert decrypted(KeyRing({"k1": K1, "k2": K2}, "k2"), blob) == b"archive" * 20_000


PLAIN = bytes(range(256)) * 1000  # 256000 bytes: four frames


def test_a_truncated_stream_fails():
    r = ring()
    blob = encrypted(r, PLAIN)
    for cut in (1, 17, len(blob) // 2):
        with pytest.raises(DecryptionFailed):
            decrypted(r, blob[:-cut])


def test_a_stream_with_its_last_frame_dropped_fails():
    r = ring()
    head, parts = frames(encrypted(r, PLAIN))
    assert len(parts) == 4
    with pytest.raises(DecryptionFailed, match="truncated"):
        decrypted(r, head + b"".join(parts[:-1]))


def test_a_stream_with_reordered_frames_fails():
    r = ring()
    head, parts = frames(encrypted(r, PLAIN))
    swapped = [parts[1], parts[0], *parts[2:]]
    with pytest.raises(DecryptionFailed, match="authentication"):
        decrypted(r, head + b"".join(swapped))


def test_a_stream_with_a_frame_dropped_from_the_middle_fails():
    r = ring()
    head, parts = frames(encrypted(r, PLAIN))
    with pytest.raises(DecryptionFailed):
        decrypted(r, head + parts[0] + b"".join(parts[2:]))


@pytest.mark.parametrize("where", [15, 100, 70_000, -1])
def test_a_stream_with_a_flipped_byte_fails(where):
    r = ring()
    blob = bytearray(encrypted(r, PLAIN))
    blob[where] ^= 0x80
    with pytest.raises(DecryptionFailed):
        decrypted(r, bytes(blob))


def test_frames_from_another_stream_are_not_accepted():
    r = ring()
    head_a, parts_a = frames(encrypted(r, PLAIN))
    _, parts_b = frames(encrypted(r, PLAIN))
    with pytest.raises(DecryptionFailed):
        decrypted(r, head_a + parts_a[0] + b"".join(parts_b[1:]))


def test_a_stream_that_is_not_an_archive_fails():
    with pytest.raises(DecryptionFailed, match="not an archive"):
        decrypted(ring(), b"PK\x03\x04 plain zip")


# -- signed tokens -----------------------------------------------------------------------

T0 = 1_800_000_000.0


def test_a_signed_token_round_trips():
    signer = Signer(b"s" * 32, purpose="verify-email")
    token = signer.sign("req-1:abc.def", ttl_seconds=60, now=T0)
    assert signer.unsign(token, now=T0 + 59) == "req-1:abc.def"


@pytest.mark.parametrize("part", [0, 1, 2])
def test_a_tampered_token_is_refused(part):
    signer = Signer(b"s" * 32, purpose="verify-email")
    pieces = signer.sign("req-1", ttl_seconds=60, now=T0).split(".")
    pieces[part] = pieces[part][:-1] + ("A" if pieces[part][-1] != "A" else "B")
    if part == 1:
        pieces[1] = str(int(T0) + 10_000)  # a later expiry
    with pytest.raises(BadSignature):
        signer.unsign(".".join(pieces), now=T0)


@pytest.mark.parametrize("token", ["", "a.b", "a.b.c.d", "a.notanumber.c"])
def test_a_malformed_token_is_refused(token):
    with pytest.raises(BadSignature):
        Signer(b"s" * 32, purpose="p").unsign(token)


def test_a_token_for_another_purpose_is_refused():
    token = Signer(b"s" * 32, purpose="download-export").sign("e1", ttl_seconds=60, now=T0)
    with pytest.raises(BadSignature):
        Signer(b"s" * 32, purpose="verify-email").unsign(token, now=T0)


def test_a_token_signed_with_another_key_is_refused():
    token = Signer(b"o" * 32, purpose="p").sign("e1", ttl_seconds=60, now=T0)
    with pytest.raises(BadSignature):
        Signer(b"s" * 32, purpose="p").unsign(token, now=T0)


def test_an_expired_token_is_refused_as_expired():
    signer = Signer(b"s" * 32, purpose="p")
    token = signer.sign("e1", ttl_seconds=60, now=T0)
    with pytest.raises(Expired):
        signer.unsign(token, now=T0 + 61)


# -- blind index -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant", ["dana.reyes@example.com", "Dana.Reyes@Example.COM", "  dana.reyes@example.com\n"]
)
def test_the_blind_index_of_an_email_ignores_case_and_surrounding_space(variant):
    index = BlindIndex(b"i" * 32)
    assert index.email(variant) == index.email("dana.reyes@example.com")


def test_the_blind_index_differs_across_keys_and_people_and_hides_the_value():
    a, b = BlindIndex(b"a" * 32), BlindIndex(b"b" * 32)
    assert a.email("dana@example.com") != b.email("dana@example.com")
    assert a.email("dana@example.com") != a.email("dana@example.org")
    assert "dana" not in a.email("dana@example.com")
    assert a.of("email", "x") != a.of("phone", "x")


# -- loading keys ------------------------------------------------------------------------


def test_production_without_keys_is_refused_with_a_message_saying_how_to_fix_it(tmp_path):
    with pytest.raises(ConfigurationError) as info:
        load_keys(keys_file=None, keys_env={}, data_dir=tmp_path, production=True)
    message = str(info.value)
    assert "PRIVACY_KEYS_FILE" in message and "PRIVACY_KEYS_JSON" in message
    assert "privacy keys generate" in message
    assert not (tmp_path / "keys.json").exists()


def test_production_with_demo_keys_is_refused(tmp_path):
    demo = json.dumps(Keys.generate(demo=True).to_json())
    with pytest.raises(ConfigurationError, match="demo keys"):
        load_keys(
            keys_file=None, keys_env={"PRIVACY_KEYS_JSON": demo}, data_dir=tmp_path, production=True
        )


def test_production_refuses_the_demo_keys_a_first_run_generated(tmp_path):
    load_keys(keys_file=None, keys_env={}, data_dir=tmp_path, production=False)
    with pytest.raises(ConfigurationError, match="demo keys"):
        load_keys(keys_file=tmp_path / "keys.json", keys_env={}, data_dir=tmp_path, production=True)


def test_production_accepts_operator_keys_from_a_file(tmp_path: Path):
    path = tmp_path / "prod-keys.json"
    made = Keys.generate(demo=False)
    path.write_text(json.dumps(made.to_json()))
    keys = load_keys(keys_file=path, keys_env={}, data_dir=tmp_path, production=True)
    assert not keys.demo
    assert keys.ring.decrypt(made.ring.encrypt(b"x")) == b"x"


def test_demo_keys_are_generated_once_and_reused(tmp_path):
    first = load_keys(keys_file=None, keys_env={}, data_dir=tmp_path, production=False)
    second = load_keys(keys_file=None, keys_env={}, data_dir=tmp_path, production=False)
    assert first.demo and second.demo
    assert first.to_json() == second.to_json()
    assert (tmp_path / "keys.json").stat().st_mode & 0o077 == 0


def test_keys_round_trip_through_json():
    keys = Keys.generate(demo=False)
    again = Keys.from_json(json.loads(json.dumps(keys.to_json())))
    assert again.to_json() == keys.to_json()


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {"active": "k1", "data_keys": {"k1": "AAAA"}, "index_key": "a", "signing_key": "b"},
        {"active": "k1", "data_keys": "nope", "index_key": "a", "signing_key": "b"},
    ],
    ids=["empty", "short key", "keys not a mapping"],
)
def test_malformed_key_material_is_a_configuration_error(raw):
    with pytest.raises(ConfigurationError):
        Keys.from_json(raw)
