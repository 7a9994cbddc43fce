"""Credentials never reach a log line or the Dagster UI: URLs are redacted before they are shown.

A database URL such as ``postgresql://user:secret@host/db`` names its password in the clear;
everything that logs a storage URL or records it as metadata passes it through
:func:`redact_url` first.
"""

from __future__ import annotations

from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

#: Query parameters that carry secrets in SQLAlchemy, libpq and object-store URLs.
SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "secret", "token", "sslpassword", "access_key", "secret_key"})
MASK = "***"


def redact_url(url: str | None) -> str | None:
    """``url`` with any password (user-info or a secret query parameter) replaced by ``***``.

    Paths (``/tmp/optuna.db``) and URLs without credentials come back unchanged; a string
    that does not parse as a URL is returned masked whole rather than risk leaking it.
    """
    if url is None or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return MASK
    netloc = parts.netloc
    if password is not None:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_QUERY_KEYS for k, _ in pairs):
            query = urlencode([(k, MASK if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing secret (urlunsplit would also drop an empty authority's '//')
    return urlunsplit(SplitResult(parts.scheme, netloc, parts.path, query, parts.fragment))
