"""The chaos suite: real worker processes, injected faults, and every request accounted for."""
