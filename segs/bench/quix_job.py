"""The peer job, written idiomatically with Quix Streams: 1-minute tumbling event-time windows
per meter (the message key) with count, mean, max and min power and the energy sum, emitted
when each window closes. Runs in its own virtual environment (see :mod:`segs.bench.peer`)
and imports nothing from segs.

    python quix_job.py BOOTSTRAP INPUT_TOPIC GROUP STATE_DIR OUTPUT_TOPIC
"""

import sys
from datetime import datetime, timedelta

from quixstreams import Application
from quixstreams.dataframe.windows import Count, Max, Mean, Min, Sum


def event_time(value, headers, timestamp, timestamp_type):  # type: ignore[no-untyped-def]
    """Window by the reading's own timestamp (ISO-8601), as the service does."""
    return int(datetime.fromisoformat(value["timestamp"]).timestamp() * 1000)


def main() -> None:
    bootstrap, topic, group, state_dir, output = sys.argv[1:6]
    app = Application(broker_address=bootstrap, consumer_group=group,
                      auto_offset_reset="earliest", state_dir=state_dir, loglevel="WARNING")
    readings = app.topic(topic, value_deserializer="json", timestamp_extractor=event_time)
    windows = (
        app.dataframe(readings)
        .tumbling_window(timedelta(minutes=1), grace_ms=timedelta(seconds=5))
        .agg(count=Count(), mean=Mean("powerKw"), max=Max("powerKw"), min=Min("powerKw"),
             energy=Sum("energyKwh"))
        .final()
    )
    windows.to_topic(app.topic(output, value_serializer="json"))
    app.run()


if __name__ == "__main__":
    main()
