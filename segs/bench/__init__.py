"""The benchmarks: every piece of benchmark code is here, the figures and results in
``benchmarks/`` (its README.md and ``results/``).

``segs-stream bench``, end to end against real Kafka and PostgreSQL: :mod:`~segs.bench.infra`
(servers, databases, topics, the service set up for measuring), one module per scenario
(:mod:`~segs.bench.ceiling`, :mod:`~segs.bench.pipeline`, :mod:`~segs.bench.latency`,
:mod:`~segs.bench.checkpoint`, :mod:`~segs.bench.peer`), :mod:`~segs.bench.report` (JSON, chart,
README figures) and :mod:`~segs.bench.suite`, which runs them in order. Needs the ``bench``
extra (matplotlib) for the chart.

Single measurements, each run as ``python -m segs.bench.<name>``: :mod:`~segs.bench.engine`
(decoder, windows, engine memory), :mod:`~segs.bench.anomaly` (the detector),
:mod:`~segs.bench.simulator` (the simulator), :mod:`~segs.bench.detector_cost` (the pipeline
with detection on and off) and :mod:`~segs.bench.prefetch_sweep` (prefetch and batch size).
"""
