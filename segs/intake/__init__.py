"""Intake: Kafka message values decoded and validated into columnar
:class:`~segs.intake.readings.Readings` (the C scanner, the Python paths, the rules).
"""
