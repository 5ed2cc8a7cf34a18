"""The audit stage's entry points over a Store: the calibration measured, stored and overridden; the thresholds an
audit or a duplicates listing uses (calibrated first when missing); the audit's pass and its table."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import psycopg

from .. import search
from ..db.connect import connect
from ..db.store import Store
from ..model.embed import Model
from ..model.pixels import Preprocess
from . import calibration, findings
from .calibration import SAMPLE, Calibration
from .findings import Audit, DuplicateGroup, stored_model
from .neighbours import Progress


def calibrate(store: Store, prep: Preprocess, model: Callable[[], Model], *, sample: int = SAMPLE,
              progress: Progress | None = None, stored: str | None = None) -> Calibration:
    """Measure and store the duplicate calibration of the stored rows' model (`stored`, read when not given).

    `model` is called only when stored files can be read (rows alone calibrate the hash's fallback only), and is
    refused when it is not the stored rows' model.
    """
    stored = stored or stored_model(store)

    def loaded() -> Model:
        store.check_model(model().identity, action="calibration")
        return model()

    measured = calibration.measure(store, stored, prep, loaded, sample=sample, progress=progress)
    calibration.save(store, measured)
    return calibration.load(store, stored) or measured


def set_calibration(store: Store, *, distance: float | None = None, hash_bits: int | None = None,
                    clear: bool = False) -> Calibration:
    """Override (or with `clear`, stop overriding) the stored model's duplicate distance and hash threshold."""
    stored = stored_model(store)
    calibration.override(store, stored, distance=distance, hash_bits=hash_bits, clear=clear)
    return calibration.load(store, stored)  # type: ignore[return-value]


def thresholds(store: Store, prep: Preprocess, model: Callable[[], Model], *, recalibrate: bool,
               distance: float | None, hash_bits: int | None, progress: Progress | None) -> Calibration:
    """The stored rows' calibration (measured now if missing, or with `recalibrate`), with one-off overrides."""
    calibration.check(distance, hash_bits)
    stored = stored_model(store)
    measured = None if recalibrate else calibration.load(store, stored)
    if measured is None or measured.sample == 0:  # none, or none from files: they may be readable now
        measured = calibrate(store, prep, model, sample=SAMPLE, progress=progress, stored=stored)
    if distance is not None:
        measured = dataclasses.replace(measured, override_distance=distance)
    if hash_bits is not None:
        measured = dataclasses.replace(measured, override_hash_bits=hash_bits)
    return measured


def audit(store: Store, used: Calibration, *, k: int = findings.K, progress: Progress | None = None) -> Audit:
    """Audit every stored image with these thresholds and replace the image_audit table with the findings."""
    result = findings.audit(store, used, k=k, progress=progress, files_readable=used.sample > 0,
                            connect=connector(store), same_class=same_class(store))
    findings.write(store, result)
    return result


def duplicates(store: Store, used: Calibration, progress: Progress | None = None) -> list[DuplicateGroup]:
    """Groups of stored copies by the audit's copy rule, with these thresholds."""
    return findings.duplicate_groups(store, used, progress, connector(store))


def connector(store: Store) -> Callable[[], psycopg.Connection[Any]]:
    """Opens more connections to the store's database, for work on several at once (the audit's pass); it does not
    touch the store, so threads may call it while the facade holds its lock."""
    url = store.url
    return lambda: connect(url)


def same_class(store: Store) -> Callable[[np.ndarray, str, str, int], list[tuple[int, float]]]:
    """Mode same for stored vectors, as find searches: what the audit searches its suspects again with."""
    def run(vector: np.ndarray, cls: str, sha: str, k: int) -> list[tuple[int, float]]:
        return [(m.id, m.distance) for m in search.run(store, vector, "same", k=k, cls=cls, skip_sha=sha)]
    return run
