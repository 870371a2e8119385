"""The execution metadata the emulator reports, from documented formulas rather than invention.

The emulator computes classically, but it reports the circuit a QNN would need for the same
problem, so clients see plausible numbers that scale with what they ask for:

* problem_size: the number of values the model is conditioned on (see `predictors`).
* n_qubits = ceil(log2(problem_size)) + 1, at least 2: an amplitude-encoded data register
  (log2 of the values it holds) plus one readout ancilla.
* raw depth = 2 * n_qubits (state preparation)
              + LAYERS * (1 rotation layer + (n_qubits - 1) CNOT ladder).
* circuit_depth = ceil(raw depth * (1 - 0.15 * optimization_level)), level clamped to 0..3:
  higher transpiler optimization levels buy shallower circuits.
* cost_usd = circuits * SHOTS * n_qubits * circuit_depth * USD_PER_QUBIT_LAYER_SHOT, where a
  simulation runs one circuit per scenario.
* execution_time_ms: wall time actually spent computing, plus any injected latency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEVICE = "emulator-statevector-cpu"
LAYERS = 4
SHOTS = 1024
USD_PER_QUBIT_LAYER_SHOT = 2e-8
DEPTH_REDUCTION_PER_LEVEL = 0.15


@dataclass(frozen=True)
class CircuitShape:
    n_qubits: int
    circuit_depth: int


def circuit_shape(problem_size: int, optimization_level: int) -> CircuitShape:
    """Qubits and depth for a problem of `problem_size` values (formula in the module doc)."""
    qubits = max(2, math.ceil(math.log2(max(problem_size, 2))) + 1)
    raw_depth = 2 * qubits + LAYERS * (1 + (qubits - 1))
    level = min(max(optimization_level, 0), 3)
    depth = math.ceil(raw_depth * (1.0 - DEPTH_REDUCTION_PER_LEVEL * level))
    return CircuitShape(qubits, depth)


def cost_usd(shape: CircuitShape, circuits: int) -> float:
    """Billed cost of running `circuits` circuits of this shape at SHOTS shots each."""
    return round(
        circuits * SHOTS * shape.n_qubits * shape.circuit_depth * USD_PER_QUBIT_LAYER_SHOT, 8
    )


@dataclass(frozen=True)
class ExecutionReport:
    """The `execution` object of a predict response."""

    model_id: str
    mode: str
    shape: CircuitShape
    circuits: int
    optimization_level: int
    execution_time_ms: float
    cost_usd: float

    def to_json(self) -> dict[str, object]:
        return {
            "model_id": self.model_id,
            "device": DEVICE,
            "n_qubits": self.shape.n_qubits,
            "circuit_depth": self.shape.circuit_depth,
            "shots": SHOTS,
            "circuits": self.circuits,
            "execution_time_ms": self.execution_time_ms,
            "cost_usd": self.cost_usd,
            "mode": self.mode,
            "optimization_level": self.optimization_level,
        }


def execution_report(
    *,
    model_id: str,
    mode: str,
    problem_size: int,
    circuits: int,
    optimization_level: int,
    execution_time_ms: float,
) -> ExecutionReport:
    """What to report for one predict call (formulas in the module doc)."""
    shape = circuit_shape(problem_size, optimization_level)
    return ExecutionReport(
        model_id=model_id,
        mode=mode,
        shape=shape,
        circuits=circuits,
        optimization_level=optimization_level,
        execution_time_ms=round(execution_time_ms, 3),
        cost_usd=cost_usd(shape, circuits),
    )
