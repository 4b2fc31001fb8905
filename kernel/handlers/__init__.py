"""Command handlers, one module per concern; the table lives in ``kernel.kernel``."""
