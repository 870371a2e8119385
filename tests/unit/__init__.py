"""Tests that need no broker, database or emulator process: `make unit`, seconds."""
