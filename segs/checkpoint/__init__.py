"""Checkpoint: what one checkpoint writes, its COPY encoding, the database sink and its SQL, and
the schema migrations.
"""
