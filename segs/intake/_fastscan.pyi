from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

def scan_readings(
    values: Sequence[bytes | None],
    max_bytes: int,
    min_ts_ms: int,
    max_ts_ms: int,
    meter_slots: dict[str, int],
    region_slots: dict[str, int],
    accepted: NDArray[np.bool_],
    meter: NDArray[np.int32],
    region: NDArray[np.int32],
    ts_ms: NDArray[np.int64],
    power: NDArray[np.float64],
    energy: NDArray[np.float64],
    voltage: NDArray[np.float64],
) -> list[tuple[int, str | None, str | None]]: ...
