"""`segs-stream bench`: end-to-end benchmarks against real Kafka and PostgreSQL.  One module per
job: :mod:`~segs.bench.infra` (servers, topics, the service as a process), one module per
scenario (:mod:`~segs.bench.ceiling`, :mod:`~segs.bench.pipeline`, :mod:`~segs.bench.latency`,
:mod:`~segs.bench.checkpoint`, :mod:`~segs.bench.peer`), :mod:`~segs.bench.report` (JSON, chart,
README figures) and :mod:`~segs.bench.suite`, which runs them in order. Needs the ``bench``
extra (matplotlib) for the chart.
"""
