"""How far a harmless copy of a stored photo lands from it, for one model, against its distinct neighbours.

Distances depend on the model: a fixed duplicate distance chosen for one checkpoint is wrong for the next. The
calibration is measured on the library's own photos and stored per model identity (table model_calibration).
"""

from __future__ import annotations

from typing import Any

import psycopg

from ..errors import ImsearchError

# `find --max-distance duplicate`, the web API's max_distance and SQL's imsearch_duplicate_distance() take this name
DUPLICATE = "duplicate"


class NotCalibrated(ImsearchError):
    """No calibrated duplicate distance exists for the model in use."""


def duplicate_distance(conn: psycopg.Connection[Any], model: str) -> float:
    """The duplicate distance for `model`: the user's override, else the calibrated one.

    Raises NotCalibrated when the model was never calibrated, or when its copies and neighbours overlap (it cannot
    tell a copy from a neighbour, and only the perceptual hash finds duplicates).
    """
    row = conn.execute(
        "SELECT coalesce(override_distance, duplicate_distance), copy_distance_p95, neighbour_distance_p05 "
        "FROM model_calibration WHERE model = %s",
        (model,),
    ).fetchone()
    if row is None:
        raise NotCalibrated(f"no duplicate distance is calibrated for model {model}: run `imsearch calibrate` "
                            "(or `imsearch audit`, which calibrates first)")
    if row[0] is None:
        raise NotCalibrated(
            f"model {model} cannot tell a copy from a neighbour: its copies land up to {row[1]:.4f} from their "
            f"originals, distinct photos from {row[2]:.4f} (`imsearch calibrate` shows the figures); give a number, "
            "or set one with `imsearch calibrate --set-distance D`"
        )
    return float(row[0])
