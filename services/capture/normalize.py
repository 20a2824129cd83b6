"""Normalised keys that tell the same customer apart from a new one: e-mail, phone in E.164
(Chinese mobile numbers included), and company name within a region. Pure functions."""

from __future__ import annotations

import re
import unicodedata

_CJK_SUFFIXES = ("股份有限公司", "有限责任公司", "有限公司", "集团公司", "集团", "公司")
_LEGAL_WORDS = {"co", "company", "ltd", "limited", "inc", "llc", "corp", "corporation", "gmbh"}
_NOT_WORD = re.compile(r"[^\w]+", re.UNICODE)
_CN_MOBILE = re.compile(r"^1[3-9]\d{9}$")


def email_key(email: str | None) -> str | None:
    if not email or "@" not in email:
        return None
    return email.strip().lower()


def phone_e164(phone: str | None) -> str | None:
    """`+86 138 0000 0000`, `138-0000-0000`, `0086 13800000000` → `+8613800000000`; None when
    the number cannot be placed (a local number without its country)."""
    if not phone:
        return None
    raw = phone.strip()
    digits = re.sub(r"\D", "", raw)
    if raw.startswith("+"):
        number = digits
    elif digits.startswith("00"):
        number = digits[2:]
    elif _CN_MOBILE.match(digits):
        number = "86" + digits
    elif digits.startswith("86") and _CN_MOBILE.match(digits[2:]):
        number = digits
    else:
        return None
    if not 8 <= len(number) <= 15:
        return None
    return "+" + number


def company_key(name: str | None, region: str | None) -> str | None:
    """Case, width, punctuation and legal-form suffixes do not make another company."""
    if not name:
        return None
    words = _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", name).casefold()).split()
    while len(words) > 1 and words[-1] in _LEGAL_WORDS:  # whole words only: "Zinc" stays
        words.pop()
    text = "".join(words)
    for suffix in _CJK_SUFFIXES:  # one legal form at the end of a Chinese name
        if text.endswith(suffix) and len(text) > len(suffix):
            text = text[: -len(suffix)]
            break
    if not text:
        return None
    return f"{(region or '').strip().upper()}|{text}"


def match_keys(email: str | None, phone: str | None, company: str | None,
               region: str | None) -> list[tuple[str, str]]:  # fmt: skip
    """The keys of one lead, in the order the dedupe rules are tried."""
    keys = [
        ("email", email_key(email)),
        ("phone", phone_e164(phone)),
        ("company_region", company_key(company, region)),
    ]
    return [(rule, key) for rule, key in keys if key]
