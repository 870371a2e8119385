"""eglo's worker: consumes optimization requests, calls the QNN, stores runs, emits events."""
