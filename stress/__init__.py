"""Stress harness for scoping: runs scenarios against a real PostgreSQL server."""
