"""Revision scripts, applied in order by ``treadle.adapters.sql.migrate.migrate``."""
