"""Masking of secrets in text: the one place that decides what a secret looks like.

Used by ``config show``/``config check`` (:meth:`segs.config.Settings.describe`, the
:class:`~segs.errors.ConfigError` lines) and by the log filter (:mod:`segs.ops.logs`), so every
output path masks the same things the same way:

- the password of a URL's user info (``scheme://user:password@host``). The user info ends at
  the *last* ``@`` of the URL, so a password holding an unencoded ``@``, ``/``, ``?`` or
  ``#`` is masked whole; a URL with an ``@`` in its path or query is masked more than needed,
  never less;
- the value of every ``key=value`` (or ``key: value``) pair whose key names a secret
  (:func:`is_secret_key`): URL query parameters, libpq ``key=value`` strings, librdkafka
  settings, log text. Quoted values are masked up to their closing quote, backslash escapes
  included.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote

MASK: Final = "***"

# Words that make a key name a secret: passwords and passphrases, secrets, tokens,
# credentials, key material (PEM text, private keys), and settings that embed secrets
# (sasl.oauthbearer.config, JAAS). Paths to key files are not secrets and stay visible.
_KEY_WORDS: Final = (
    r"pass|pwd|secret|token|credential|api[_.-]?key|private[_.-]?key|key[_.-]?pem"
    r"|ssl[_.-]key(?![\w.-])|oauthbearer[_.-]config|jaas"
)
_SECRET_KEY: Final = re.compile(_KEY_WORDS, re.IGNORECASE)
_KEY_VALUE: Final = re.compile(
    rf"(?P<key>[\w.\-]*(?:{_KEY_WORDS})[\w.\-]*)"
    r"(?P<sep>[\"']?\s*[:=]\s*)"
    r"(?!Secret\()"
    r"(?:(?P<q>[\"'])(?:\\.|(?!(?P=q)).)*(?:(?P=q)|$)|[^\s,;&}\])\"']+)",
    re.IGNORECASE | re.DOTALL,
)
_URL: Final = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s\"'<>]*")


def is_secret_key(key: str) -> bool:
    """True for keys like ``password``, ``sasl.password``, ``ssl.key.pem``, ``api_key``."""
    return _SECRET_KEY.search(key) is not None


def mask_pairs(text: str) -> str:
    """``text`` with the value of every secret-looking ``key=value`` pair masked."""

    def masked(m: re.Match[str]) -> str:
        q = m["q"] or ""
        return f"{m['key']}{m['sep']}{q}{MASK}{q}"

    return _KEY_VALUE.sub(masked, text)


def _mask_query(query: str) -> str:
    """A URL query with the values of secret keys (percent-decoded names) masked."""
    out = []
    for item in query.split("&"):
        key, sep, _ = item.partition("=")
        out.append(f"{key}={MASK}" if sep and is_secret_key(unquote(key)) else item)
    return "&".join(out)


def mask_url(url: str) -> str:
    """``url`` (one whole URL) with its password and secret query values masked."""
    head, sep, rest = url.partition("://")
    if not sep:
        return mask_pairs(url)
    tail = ""
    at = rest.rfind("@")
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        head = f"{head}://{user}:{MASK}@" if colon else f"{head}://{rest[:at]}@"
        rest = rest[at + 1:]
    else:
        head += "://"
    base, qmark, query = rest.partition("?")
    if qmark:
        tail = "?" + _mask_query(query)
    return head + base + tail  # host, port and path hold no key=value pairs


def mask_secrets(text: str) -> str:
    """Free text (a log line, an error) with URL passwords and secret values masked.

    A URL in free text ends at white space or a quote; pass a value known to be one URL to
    :func:`mask_url` instead, which also masks a password holding those.
    """
    return mask_pairs(_URL.sub(lambda m: mask_url(m[0]), text))
