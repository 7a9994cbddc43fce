"""What the asset catalog says about every asset: who owns it and where its source is published.

Bound from the environment here, read once when the code location loads:

- ``CVOPS_ASSET_OWNERS``: comma-separated owners of every asset, each an e-mail address or a
  ``team:<name>`` (default ``team:cvops``);
- ``CVOPS_GIT_URL`` (and ``CVOPS_GIT_BRANCH``, default ``main``): when set, each asset's
  code reference links to its file in that repository (``https://github.com/org/repo``)
  instead of to the local file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

ASSET_OWNERS_ENV = "CVOPS_ASSET_OWNERS"
DEFAULT_ASSET_OWNERS = "team:cvops"
GIT_URL_ENV = "CVOPS_GIT_URL"
GIT_BRANCH_ENV = "CVOPS_GIT_BRANCH"
DEFAULT_GIT_BRANCH = "main"

# The shapes Dagster accepts for an owner; checked here so a typo names the variable.
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def asset_owners_from_env(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The owners of every asset: ``CVOPS_ASSET_OWNERS`` split on commas, else ``team:cvops``.

    Raises:
        ValueError: an owner is neither an e-mail address nor ``team:<name>``.
    """
    text = environ.get(ASSET_OWNERS_ENV, "").strip() or DEFAULT_ASSET_OWNERS
    owners = list(dict.fromkeys(o.strip() for o in text.split(",") if o.strip()))
    bad = [o for o in owners if not (_EMAIL.match(o) or (o.startswith("team:") and len(o) > len("team:")))]
    if bad or not owners:
        raise ValueError(
            f"{ASSET_OWNERS_ENV}={text!r}: every owner must be an e-mail address or 'team:<name>' "
            f"(comma-separated); not {', '.join(map(repr, bad))}"
        )
    return owners


@dataclass(frozen=True)
class GitSource:
    """Where the code location's source is published: repository URL and branch."""

    url: str
    branch: str


def git_source_from_env(environ: Mapping[str, str] = os.environ) -> GitSource | None:
    """``CVOPS_GIT_URL``/``CVOPS_GIT_BRANCH``, or ``None`` (code references stay local files)."""
    url = environ.get(GIT_URL_ENV, "").strip().rstrip("/")
    if not url:
        return None
    return GitSource(url.removesuffix(".git"), environ.get(GIT_BRANCH_ENV, "").strip() or DEFAULT_GIT_BRANCH)
