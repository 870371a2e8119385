"""A local stand-in for the external QNN prediction API: computed answers, injectable faults.

Entry points: `qnn_emulator.server.running_emulator` / `build_app`, `qnn_emulator.cli`, and
`python -m qnn_emulator`. Submodules are imported explicitly so the numeric models can be used
without pulling in the web stack.
"""
