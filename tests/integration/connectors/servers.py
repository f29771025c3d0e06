"""The database servers the connector tests run against, reached as their admin."""

from __future__ import annotations

import pytest
import sqlalchemy as sa


def admin_engine(name: str, url: str) -> sa.Engine:
    """An engine on the server at `url`; the test fails (never skips) if it does not answer."""
    admin = sa.create_engine(url)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.fail(f"{name} is not running on 127.0.0.1 (./dev services starts it): {exc}")
    return admin
