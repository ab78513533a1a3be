"""Plumbing shared by every service: settings, logging, database, errors, server bootstrap."""
