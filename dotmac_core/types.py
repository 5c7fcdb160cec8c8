"""Column types of the toolkit, at a public path that migrations can import.

Alembic writes a column's type as `module.Class(...)`; the models' timestamp
type renders as `dotmac_core.types.UTCDateTime()` (see `dotmac_core.migrations`).
"""

from __future__ import annotations

from .db._types import UTCDateTime as UTCDateTime

__all__ = ["UTCDateTime"]
