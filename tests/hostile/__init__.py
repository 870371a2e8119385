"""The hostile-world suite: one row per attack or fault, what eglo did about it."""
