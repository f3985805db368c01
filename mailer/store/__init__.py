"""Database adapters. Store functions are synchronous SQLAlchemy Core functions that take a
``Connection``; ``Database`` runs each one as a single transaction (see ``db.py``)."""
