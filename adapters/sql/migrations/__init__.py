"""Alembic environment and revision scripts for the SQL adapters (run by ``migrate``)."""
