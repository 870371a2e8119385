"""Versioned message contracts shared by eglo's producers, workers and downstream consumers."""
