"""The FastAPI side of SPEC §8: a dependency that turns `Authorization: Bearer …` into a
Principal, or answers 401."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import HTTPException, Request

from shared.auth import InvalidToken, Principal, verify_token
from shared.clock import Clock, SystemClock
from shared.settings import Settings


def bearer(
    settings: Settings, clock: Clock | None = None
) -> Callable[[Request], Awaitable[Principal]]:
    secret = settings.secret_for_tokens()
    time = clock or SystemClock()

    async def authenticate(request: Request) -> Principal:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "bearer token required", {"WWW-Authenticate": "Bearer"})
        try:
            return verify_token(token.strip(), secret, time.now())
        except InvalidToken as exc:
            raise HTTPException(
                401, f"invalid token: {exc}", {"WWW-Authenticate": "Bearer"}
            ) from exc

    return authenticate
