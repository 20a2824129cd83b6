"""Crypto-shredding of personal data (SPEC §8): a lead's contact is stored sealed with a key of
its own from the start; forgetting the lead destroys the key, after which every read shows the
contact as erased while the rest of the history (company, amounts, stages, dates) stays. Keys
for matching (e-mail, phone) are stored as keyed hashes, never in clear."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
ERASED_CONTACT: dict[str, Any] = {"name": "(erased)", "email": None, "phone": None, "title": None}


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def seal(key: bytes, value: dict[str, Any]) -> dict[str, str]:
    """`value` encrypted (AES-256-GCM, a fresh nonce each time) as `{"sealed": base64}`."""
    nonce = os.urandom(12)
    ciphertext = AESGCM(key).encrypt(nonce, json.dumps(value).encode(), None)
    return {"sealed": base64.b64encode(nonce + ciphertext).decode()}


def is_sealed(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"sealed"}


def unseal(key: bytes | None, value: dict[str, Any]) -> dict[str, Any]:
    """The value in clear; erased when its key was destroyed; as it is when never sealed."""
    if not is_sealed(value):
        return value
    if key is None:
        return dict(ERASED_CONTACT)
    raw = base64.b64decode(value["sealed"])
    opened: dict[str, Any] = json.loads(AESGCM(key).decrypt(raw[:12], raw[12:], None))
    return opened


def keyed_hash(secret: bytes, text: str) -> str:
    """A matching key that reveals nothing of the value without the secret."""
    return "h:" + hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()
