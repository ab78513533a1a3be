"""Bearer tokens: JWTs signed with EdDSA (Ed25519). Services hold only the public key; whoever
holds the private key issues tokens (`make token`, or an identity provider in production).

`python -m servicekit.tokens --sub SUBJECT --scope SCOPE [--ttl SECONDS]` prints one.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt

from servicekit.errors import ServiceError, Unauthenticated
from servicekit.settings import AuthSettings, SettingsError, certs_dir_of

ALGORITHM = "EdDSA"  # pinned: a token naming any other alg (`none`, HS256, …) is refused
# How far the issuer's clock may be ahead (iat, nbf) or behind (exp) of the service's.
CLOCK_SKEW_SECONDS = 30
SCOPES = ("user", "admin")
_MAX_TOKEN_CHARS = 4096
_HOW_TO_GET_ONE = "send `authorization: Bearer <token>` (locally: `make token SUB=… SCOPE=…`)"


@dataclass(frozen=True)
class Claims:
    """What a verified token says of its holder, until when."""

    subject: str
    scopes: frozenset[str]
    expires: float  # seconds since the epoch


class TokenVerifier:
    def __init__(self, settings: AuthSettings) -> None:
        try:
            self._key = Path(settings.public_key_file).read_bytes()
        except OSError as error:
            raise SettingsError(
                f"cannot read AUTH_TOKEN_PUBLIC_KEY_FILE {settings.public_key_file!r} "
                f"({error.strerror}); run `make certs`"
            ) from None
        self._issuer = settings.issuer
        self._audience = settings.audience
        self._max_lifetime = settings.max_lifetime_seconds
        # A client sends the same token on every call: its signature is checked once (about
        # 0.2 ms of CPU), its expiry on every call. Refused tokens are not remembered.
        self._verified = functools.lru_cache(maxsize=4096)(self._decode)

    def verify(self, authorization: str | None) -> Claims:
        """The claims of an `authorization` metadata value; Unauthenticated, with a reason a
        client can act on, when there is no valid token in it."""
        if not authorization:
            raise Unauthenticated(f"no credentials: {_HOW_TO_GET_ONE}", reason="TOKEN_MISSING")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token or len(token) > _MAX_TOKEN_CHARS:
            raise Unauthenticated(
                f"the authorization metadata is not a bearer token: {_HOW_TO_GET_ONE}",
                reason="TOKEN_MALFORMED",
            )
        claims = self._verified(token.strip())
        if claims.expires + CLOCK_SKEW_SECONDS <= time.time():
            raise _expired()
        return claims

    def _decode(self, token: str) -> Claims:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
                leeway=CLOCK_SKEW_SECONDS,
            )
        except jwt.ExpiredSignatureError:
            raise _expired() from None
        except jwt.InvalidTokenError as error:
            raise _invalid(error) from None
        if not str(claims["sub"]).strip():
            raise Unauthenticated("the token was refused: its sub is empty", reason="TOKEN_INVALID")
        expires, issued = float(claims["exp"]), float(claims["iat"])
        if expires - issued > self._max_lifetime:
            raise Unauthenticated(
                f"the token was refused: it lives longer than {self._max_lifetime:g} s",
                reason="TOKEN_INVALID",
            )
        return Claims(str(claims["sub"]), _scopes(claims.get("scope")), expires)


def _expired() -> ServiceError:
    return Unauthenticated("the token has expired", reason="TOKEN_EXPIRED")


def _invalid(error: jwt.InvalidTokenError) -> ServiceError:
    if isinstance(error, jwt.InvalidAlgorithmError):
        detail = f"its alg is not accepted (tokens are signed with {ALGORITHM})"
    elif isinstance(error, jwt.InvalidSignatureError):
        detail = "its signature does not verify with the service's key"
    elif isinstance(error, jwt.DecodeError):
        detail = "it is not a well-formed JWT"
    else:
        detail = str(error)
    return Unauthenticated(f"the token was refused: {detail}", reason="TOKEN_INVALID")


def _scopes(raw: object) -> frozenset[str]:
    return frozenset(raw.split()) if isinstance(raw, str) else frozenset()


def issue_token(
    private_key: bytes,
    settings: AuthSettings,
    subject: str,
    scopes: list[str],
    ttl: timedelta = timedelta(hours=1),
) -> str:
    now = datetime.now(UTC)
    claims = {
        "iss": settings.issuer,
        "aud": settings.audience,
        "sub": subject,
        "scope": " ".join(scopes),
        "iat": now,
        "exp": now + ttl,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(claims, private_key, algorithm=ALGORITHM)


def main() -> None:
    parser = argparse.ArgumentParser(description="Print a bearer token for grpcurl or a client.")
    parser.add_argument("--sub", required=True, help="the subject: a user's id, or an operator")
    parser.add_argument("--scope", required=True, help=f"space-separated, of {', '.join(SCOPES)}")
    parser.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    args = parser.parse_args()
    settings = AuthSettings.from_env(os.environ)
    certs_dir = certs_dir_of(os.environ)
    key_file = os.environ.get("AUTH_TOKEN_PRIVATE_KEY_FILE") or f"{certs_dir}/token-signing.key"
    scopes = args.scope.split()
    if unknown := set(scopes) - set(SCOPES):
        parser.error(f"unknown scope {sorted(unknown)}; known: {', '.join(SCOPES)}")
    print(
        issue_token(
            Path(key_file).read_bytes(),
            settings,
            args.sub,
            scopes,
            timedelta(seconds=args.ttl),
        )
    )


if __name__ == "__main__":
    main()
