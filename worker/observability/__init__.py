"""Logs, traces and metrics, shared by every eglo process."""
