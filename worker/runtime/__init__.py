"""The worker process and all its I/O: lifecycle, consumer, pipeline, store, outbox, QNN client."""
