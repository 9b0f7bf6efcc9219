"""Password hashing with argon2id (the OWASP-recommended KDF), and the password policy."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = ["MIN_PASSWORD_LENGTH", "check_password_policy", "hash_password", "needs_rehash", "verify_password"]

MIN_PASSWORD_LENGTH = 10
_HASHER = PasswordHasher()  # argon2id, 64 MiB, 3 passes: the library's (RFC 9106 low-memory) defaults
#: Verified against when the user does not exist, so a wrong user name costs as long as a wrong password.
_DUMMY_HASH = _HASHER.hash("not a password of anyone")


def check_password_policy(password: str) -> str:
    """The password, or ``ValueError`` saying what is wrong with it."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > 1024:
        raise ValueError("password must have at most 1024 characters")
    return password


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches; ``password_hash`` None (no such user) still spends the time."""
    try:
        return _HASHER.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    return _HASHER.check_needs_rehash(password_hash)
