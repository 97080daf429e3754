"""Durable state: SQLite for metadata (one module per kind of record), plain files for bytes."""
