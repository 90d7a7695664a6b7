"""Encryption of secrets at rest (registry passwords) with the configured Fernet key(s)."""
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from flask import current_app


class SecretUnreadable(Exception):
    """A stored secret cannot be decrypted with the configured keys (the key was changed)."""


def _cipher() -> MultiFernet:
    # MultiFernet encrypts with the first key and decrypts with any, so keys can be rotated.
    keys = current_app.config["FLEET_SECRET_KEY"].split(",")
    return MultiFernet([Fernet(key.strip()) for key in keys])


def encrypt(plaintext: str) -> str:
    return _cipher().encrypt(plaintext.encode()).decode() if plaintext else ""


def decrypt(ciphertext: str) -> str:
    if not ciphertext:
        return ""
    try:
        return _cipher().decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable("a stored secret cannot be decrypted with FLEET_SECRET_KEY") from None
