"""Keep credentials out of everything we write: W&B configs, provenance files, logs, caches.

``scrub(cfg)`` masks the values of keys named like a credential (``api_key``, ``hf_token``,
``client_secret``, ``password``...) and any string that looks like a well-known token format.
Matching is on the key's *last word*, so ``max_tokens``, ``tokenizer``, ``eos_token_id`` and
``api_key_env`` (which names an environment variable, not a secret) are left alone.
``redact(text, secrets)`` removes known secret values from free text (error messages, logs).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"

# Last word of a key (after splitting on _ - . and camelCase) that marks a credential.
_SECRET_WORDS = frozenset(
    {
        "key",
        "apikey",
        "token",
        "secret",
        "secrets",
        "password",
        "passwd",
        "passphrase",
        "credential",
        "credentials",
        "authorization",
    }
)
# Separator-less spellings (``openaiapikey``, ``authtoken``) end with one of these.
_SECRET_SUFFIXES = ("apikey", "accesskey", "secretkey", "privatekey", "token", "secret", "password")
# Strings that are credentials whatever key they sit under (OpenAI/Anthropic, HF, GitHub, W&B-style,
# AWS access key ids, bearer headers). Conservative on purpose: a false positive only hides a value.
_TOKEN_PATTERNS = re.compile(
    r"(?:\bsk-[A-Za-z0-9_\-]{16,}|\bhf_[A-Za-z0-9]{20,}|\bgh[pousr]_[A-Za-z0-9]{20,}"
    r"|\bAKIA[0-9A-Z]{16}\b|\b[Bb]earer\s+[A-Za-z0-9._\-]{16,})"
)
# Secret values shorter than this are not redacted from free text (too many false matches).
MIN_SECRET_LEN = 6


def _words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_secret_key(key: Any) -> bool:
    """True when ``key``'s last word names a credential (``api_key``, ``HF_TOKEN``, ``clientSecret``)."""
    if not isinstance(key, str):
        return False
    words = _words(key)
    if not words:
        return False
    return words[-1] in _SECRET_WORDS or "".join(words).endswith(_SECRET_SUFFIXES)


def looks_like_token(value: Any) -> bool:
    """True when a string contains a well-known credential format (``sk-...``, ``hf_...``...)."""
    return isinstance(value, str) and _TOKEN_PATTERNS.search(value) is not None


def scrub(cfg: Any) -> Any:
    """A deep copy of ``cfg`` (dicts, lists, tuples, scalars) with credential values replaced by ``***``.

    Values under a credential-named key are masked whole (even dicts and lists); empty/None values stay
    as they are, so "no key configured" remains visible. Token-shaped strings are masked anywhere.
    """
    if isinstance(cfg, Mapping):
        out = {}
        for k, v in cfg.items():
            if is_secret_key(k) and v not in (None, "", {}, []) and not isinstance(v, bool):
                out[k] = MASK
            else:
                out[k] = scrub(v)
        return out
    if isinstance(cfg, list | tuple):
        return type(cfg)(scrub(v) for v in cfg)
    if looks_like_token(cfg):
        return _TOKEN_PATTERNS.sub(MASK, cfg)
    return cfg


def secret_values(cfg: Any = None, environ: Mapping[str, str] | None = None) -> list[str]:
    """The secret strings found in ``cfg`` (under credential-named keys) and in the environment.

    Feed the result to ``redact``. ``environ`` defaults to ``os.environ``; pass ``{}`` to skip it.
    """
    found: list[str] = []

    def walk(obj: Any, secret: bool) -> None:
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, secret or is_secret_key(k))
        elif isinstance(obj, list | tuple):
            for v in obj:
                walk(v, secret)
        elif isinstance(obj, str | int | float) and not isinstance(obj, bool) and secret:
            found.append(str(obj))

    walk(cfg, False)
    walk(dict(os.environ if environ is None else environ), False)
    # Longest first so a secret that contains another is removed whole.
    return sorted({s for s in found if len(s) >= MIN_SECRET_LEN}, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every occurrence of each secret (and any token-shaped string) replaced by ``***``."""
    for s in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LEN}, key=len, reverse=True):
        text = text.replace(s, MASK)
    return _TOKEN_PATTERNS.sub(MASK, text)
