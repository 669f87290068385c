"""Meter-reading simulator: deterministic, fast synthetic traffic for the ``raw_readings`` topic.

One module a job:

* :mod:`~segs.tools.simulator.options`: what to simulate and what comes out;
* :mod:`~segs.tools.simulator.model`: meters, rounds and batches (the reading model);
* :mod:`~segs.tools.simulator.inject`: anomalies, duplicates, late, invalid and out-of-order
  messages mixed in;
* :mod:`~segs.tools.simulator.encoding` and :mod:`~segs.tools.simulator.invalid`: a
  reading's bytes, and the broken ones;
* :mod:`~segs.tools.simulator.producer`: the Kafka producer loop, with
  :mod:`~segs.tools.simulator.files` (the JSON-lines copy) and
  :mod:`~segs.tools.simulator.progress`.

The same options give the same messages, byte for byte (see :mod:`~segs.tools.simulator.model`).
The loggers are ``segs.simulator`` and ``segs.simulator.kafka`` (librdkafka's, in
:mod:`~segs.tools.simulator.producer`).
"""

from __future__ import annotations

import logging

from segs.tools.simulator.encoding import EXAMPLE
from segs.tools.simulator.files import read_file, write_file
from segs.tools.simulator.invalid import INVALID_VARIANTS, make_invalid
from segs.tools.simulator.model import generate
from segs.tools.simulator.options import (
    ANOMALY_KINDS,
    KINDS,
    SimMessage,
    SimulatorOptions,
    SimulatorSummary,
    region_names,
)
from segs.tools.simulator.producer import PRODUCER_DEFAULTS, produce

__all__ = [
    "ANOMALY_KINDS",
    "EXAMPLE",
    "INVALID_VARIANTS",
    "KINDS",
    "PRODUCER_DEFAULTS",
    "SimMessage",
    "SimulatorOptions",
    "SimulatorSummary",
    "generate",
    "make_invalid",
    "produce",
    "read_file",
    "region_names",
    "write_file",
]

log = logging.getLogger("segs.simulator")
