"""The schema of the shared database, defined once: the tables each service owns and the values
their constraints allow. Alembic (migrations/env.py) compares migrations with it; the services and
the tests read its names and values instead of repeating them."""
