"""The facade's lock and the model cache's lock are taken in one order: `Imsearch._lock`, then runtimes'."""

import threading

from imsearch.api import Imsearch


def test_the_int8_calibration_does_not_wait_for_the_facade_lock(database_url):
    """Runtimes calls the calibration under its model lock; a thread holding `_lock` may be waiting for that model
    lock (ingest asks for the model under `_lock`), so the calibration must not wait for `_lock`: it used to."""
    with Imsearch(database_url) as app:
        _ = app.store  # the schema exists, as when a library is stored
        got = []
        with app._lock:  # as ingest holds it while runtimes builds the int8 model in another thread
            calibrating = threading.Thread(target=lambda: got.append(app._calibration(4)), daemon=True)
            calibrating.start()
            calibrating.join(timeout=30)
            assert not calibrating.is_alive(), "the calibration waited for the facade's lock"
        assert got and len(got[0]) == 0  # nothing stored: no photos to calibrate on
