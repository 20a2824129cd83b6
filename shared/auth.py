"""Bearer tokens for the HTTP APIs (SPEC §8): HS256 JWTs carrying role, user and team."""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

import jwt
from pydantic import BaseModel

ISSUER = "dealstream"


class Role(StrEnum):
    rep = "rep"
    manager = "manager"
    ops = "ops"
    admin = "admin"
    partner = "partner"  # a channel partner: `user` is its partner id


class Principal(BaseModel):
    role: Role
    user: str
    team: str | None = None


def visible(principal: Principal, owner: str | None, team: str | None) -> bool:
    """May `principal` see an opportunity of `owner` in `team`: a rep their own, a manager
    their team's, ops and admin all (a partner none)."""
    if principal.role in (Role.admin, Role.ops):
        return True
    if principal.role is Role.manager:
        return team is not None and team == principal.team
    return principal.role is Role.rep and owner is not None and owner == principal.user


class InvalidToken(Exception):
    """The token is missing, malformed, expired or signed with another secret."""


def issue_token(principal: Principal, secret: str, now: datetime, ttl: timedelta) -> str:
    claims = {
        "iss": ISSUER,
        "sub": principal.user,
        "role": principal.role.value,
        "team": principal.team,
        "iat": int(now.timestamp()),
        "exp": int((now + ttl).timestamp()),
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_token(token: str, secret: str, now: datetime) -> Principal:
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            issuer=ISSUER,
            # Expiry is checked below against the injected clock, not the wall clock.
            options={"require": ["exp", "sub", "iss"], "verify_exp": False, "verify_iat": False},
        )
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from exc
    if int(claims["exp"]) <= int(now.timestamp()):
        raise InvalidToken("token expired")
    try:
        return Principal(role=Role(claims["role"]), user=claims["sub"], team=claims.get("team"))
    except (KeyError, ValueError) as exc:
        raise InvalidToken("token has no valid role") from exc
