"""The everyday-shape address check (`plain_email`) against pydantic's EmailStr check, which it
stands in for: the same normalised address for everything it takes, nothing it takes that
email_validator refuses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic.networks import validate_email
from pydantic_core import PydanticCustomError

from shared.contracts.partner import SPECIAL_USE_DOMAINS, plain_email

LOCAL = st.one_of(
    st.from_regex(r"[A-Za-z0-9_+.\-!#]{1,70}", fullmatch=True),
    st.sampled_from(["Info", "SALES", "support", "Www", "abuse", "Noc", "info1"]),
)
LABEL = st.from_regex(r"[A-Za-z0-9\-_]{1,66}", fullmatch=True)
TOP = st.one_of(
    st.from_regex(r"[A-Za-z0-9\-]{1,8}", fullmatch=True),
    st.sampled_from([*sorted(SPECIAL_USE_DOMAINS), "COM", "cn", "xn--fiqs8s", "Test", "c0m"]),
)
ADDRESS = st.builds(
    lambda local, labels, top: f"{local}@{'.'.join([*labels, top])}",
    LOCAL,
    st.lists(LABEL, min_size=0, max_size=4),
    TOP,
)


def pydantic_says(value: str) -> str | None:
    try:
        return validate_email(value)[1]
    except PydanticCustomError:
        return None


@settings(max_examples=3000)
@given(st.one_of(ADDRESS, st.text(max_size=80)))
def test_the_fast_path_takes_only_what_email_validator_takes_and_normalises_it_alike(
    value: str,
) -> None:
    fast = plain_email(value)
    if fast is not None:
        assert fast == pydantic_says(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Li.Wei@Example.COM", "Li.Wei@example.com"),
        ("a_b+c-d@mail.co", "a_b+c-d@mail.co"),
        ("x@b.cn", "x@b.cn"),
        ("x@sub-1.b2.example.org", "x@sub-1.b2.example.org"),
    ],
)
def test_everyday_addresses_take_the_fast_path(value: str, expected: str) -> None:
    assert plain_email(value) == expected == pydantic_says(value)


@pytest.mark.parametrize(
    "value",
    [
        "a@ab--cd.com",  # IDNA rules: email_validator decides
        "a@b.xn--fiqs8s",  # an A-label: normalised to Unicode by email_validator
        "a@foo.test",  # special-use
        "a@1.2.3.4",  # numeric top-level domain
        "a..b@x.com",
        ".a@x.com",
        "a.@x.com",
        "a@-x.com",
        "a@x-.com",
        "a@x",  # no period
        "Li Wei <li@x.com>",  # a display name: pydantic's own parsing
        "é@x.com",
        "a" * 65 + "@x.com",  # local part too long
        "Info@x.com",  # role mailboxes: lowercased whole by email_validator
        "POSTMASTER@x.com",
        "sales@x.com",
        "a@" + "b" * 64 + ".com",  # label too long
    ],
)
def test_other_shapes_go_to_email_validator(value: str) -> None:
    assert plain_email(value) is None


def test_role_mailboxes_are_normalised_by_email_validator() -> None:
    assert pydantic_says("Info@Acme.com") == "info@acme.com"
    assert plain_email("Info@Acme.com") is None
