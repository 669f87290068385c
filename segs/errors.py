"""The exception tree of segs-stream: one root, one subclass per area.

Anything a user can cause (bad settings, unreachable servers) is raised as a subclass of
:class:`SegsError` with a message that fits on one line; the CLI prints that line and exits
instead of showing a traceback.
"""

from __future__ import annotations


class SegsError(Exception):
    """Root of every error segs-stream raises on purpose."""


class ConfigError(SegsError):
    """A setting is missing or invalid; ``setting`` names it as the user spells it."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class DatabaseError(SegsError):
    """PostgreSQL is unreachable or refused an operation."""


class SchemaError(DatabaseError):
    """PostgreSQL answered and refused a migration: trying again gives the same answer."""


class BrokerError(SegsError):
    """The Kafka cluster is unreachable or refused an operation.

    Not named ``KafkaError``: that is ``confluent_kafka.KafkaError``, the client's error
    code, which the same modules use."""




class FencedError(SegsError):
    """This worker lost ownership of a partition: its positions moved under it."""


class InfraError(SegsError):
    """A local Kafka or PostgreSQL server (for tests, demo, benchmarks) failed to start."""
