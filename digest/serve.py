"""``digest serve``: the reader-facing web app (unsubscribe, signup, preferences, archive).

The app lives in the :mod:`digest.web` package; this module keeps the entry point that
``digest serve`` and older imports use.
"""

from __future__ import annotations

from digest.web import create_app

__all__ = ["create_app"]
