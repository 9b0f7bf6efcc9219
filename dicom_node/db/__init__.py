"""Persistence: SQLAlchemy models, engines and the repository the rest of the node uses."""
