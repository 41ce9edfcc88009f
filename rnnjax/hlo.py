"""Ops per time step, read from a compiled program's text (``compiled.as_text()``).

The sequential part of a train step is a ``while`` loop over time, forward and (under
``jax.grad``) backward. Each instruction left in a compiled loop body after fusion is one
op the runtime launches per iteration: a thunk on XLA:CPU (about 1.4-2 us each), a kernel
on a GPU. Their count, not the FLOPs, bounds small-batch speed, so it is worth counting:
:func:`loop_ops` lists every while loop of a program with its body's op count,
:func:`ops_per_step` turns that into forward and backward ops per time step, and
:func:`sequence_copies` finds the loops that copy a whole [T, ...] array every iteration.
A fully unrolled scan leaves no loop to read; :func:`launched_ops` counts what one call of
any program launches, loops or none. :func:`compiled_size` counts what XLA compiled (every
instruction, fused ones too) and how much of it a step unrolled adds: what its compile time
grows with.

Counted: every instruction of the body computation except those that launch nothing
(``parameter``, ``get-tuple-element``, ``tuple``, ``constant``, ``bitcast``). A fusion is
one op, however much it computes. The loop condition is not counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Instructions that are bookkeeping of the program, not work launched at run time.
FREE_OPCODES = frozenset({"parameter", "get-tuple-element", "tuple", "constant", "bitcast"})

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(")
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
# The computations an instruction calls: a fusion's, a reduction's, a loop body, branches.
_CALLED = re.compile(r"\b(?:calls|to_apply|body|true_computation|false_computation)=%?([\w.\-]+)"
                     r"|\bbranch_computations=\{([^}]*)\}")
_COPY_SHAPE = re.compile(r"=\s*\w+\[(\d+)[,\]].*?\scopy\(")


@dataclass(frozen=True)
class Loop:
    """One compiled while loop: its JAX op name, trip count and body's launched ops."""

    op_name: str
    trip_count: int | None
    ops: tuple[str, ...]  # opcodes of the body's counted instructions, in program order
    innermost: bool  # no while loop inside its body

    @property
    def backward(self) -> bool:
        """A loop of the gradient (JAX names everything under ``jax.grad``'s transpose so)."""
        return "transpose(" in self.op_name


def computations(hlo_text: str) -> dict[str, list[tuple[str, str, str]]]:
    """``{computation name: [(instruction name, opcode, line), ...]}`` of an HLO module text."""
    result: dict[str, list[tuple[str, str, str]]] = {}
    current: list[tuple[str, str, str]] | None = None
    for line in hlo_text.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)
            if match and not line.startswith((" ", "HloModule")):
                current = result.setdefault(match.group(1), [])
            continue
        if line.strip() == "}":
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if match:
            current.append((match.group(1), match.group(2), line))
    return result


def _body(line: str) -> str:
    """The body computation's name of a ``while`` instruction's line."""
    body = _BODY.search(line)
    if body is None:
        raise ValueError(f"while without a body in: {line.strip()[:200]}")
    return body.group(1)


def _while_loops(hlo_text: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Every ``while`` of the module text, in program order: its line and its body
    computation's instructions."""
    comps = computations(hlo_text)
    return [(line, comps[_body(line)]) for instructions in comps.values()
            for _, opcode, line in instructions if opcode == "while"]


def loop_ops(hlo_text: str) -> list[Loop]:
    """Every ``while`` of the compiled module text, in program order, with its body's ops."""
    loops = []
    for line, body in _while_loops(hlo_text):
        op_name = _OP_NAME.search(line)
        trips = _TRIP_COUNT.search(line)
        ops = tuple(op for _, op, _ in body if op not in FREE_OPCODES)
        loops.append(Loop(op_name.group(1) if op_name else "",
                          int(trips.group(1)) if trips else None, ops, "while" not in ops))
    return loops


def _under_grad(loop: Loop) -> bool:
    """A loop of a differentiated pass: JAX names the forward under ``jax.grad`` ``jvp(...)``
    and its transpose ``transpose(jvp(...))``; a loop of K steps per call, outside the
    gradient, is neither."""
    return "jvp(" in loop.op_name


def _enclosing_trips(hlo_text: str) -> list[int | None]:
    """For each ``while`` of the module text, in :func:`loop_ops`' order, the product of
    the trip counts of the loops around it that run under the gradient (:func:`_under_grad`:
    a scan over chunks, not a loop of K steps per call); None where one is unknown."""
    comps = computations(hlo_text)
    caller: dict[str, str] = {}  # computation -> the computation that calls it
    runs: dict[str, str] = {}  # a loop body's computation -> its while's line
    for name, instructions in comps.items():
        for _, opcode, line in instructions:
            for match in _CALLED.finditer(line):
                for called in filter(None, re.split(r"[\s,%]+", match.group(1) or match.group(2))):
                    caller.setdefault(called, name)
            if opcode == "while":
                runs[_body(line)] = line
    out = []
    for name, instructions in comps.items():
        for _, opcode, _ in instructions:
            if opcode != "while":
                continue
            trips: int | None = 1
            at, seen = name, set()
            while at is not None and at not in seen and trips is not None:
                seen.add(at)
                line = runs.get(at)
                op_name = _OP_NAME.search(line) if line is not None else None
                if op_name is not None and "jvp(" in op_name.group(1):
                    count = _TRIP_COUNT.search(line)
                    trips = trips * int(count.group(1)) if count else None
                at = caller.get(at)
            out.append(trips)
    return out


def ops_per_step(hlo_text: str, time_steps: int) -> dict[str, float]:
    """Forward and backward ops per time step of a compiled train step over ``time_steps``:
    the ops each innermost loop of the differentiated passes (:func:`_under_grad`) launches
    in a call, its body's times its trip count (and the trip counts of such loops around
    it), over ``time_steps``.

    So an unroll of u (a body of u steps) counts its body's ops over its u steps (a
    remainder of steps, run outside the loop, not counted), the parts of ``--chunks`` add
    up whatever their lengths, several layers or directions add up, and a loop of K steps
    per call around the step counts no more than its one step (a native pass, which has no
    loop over time, counts 0). A fully unrolled scan has no loop left to read: compile with
    unroll 1. Returns ``{"forward": ops, "backward": ops}``; 0 where a direction has none.
    """
    totals = {"forward": 0.0, "backward": 0.0}
    for loop, around in zip(loop_ops(hlo_text), _enclosing_trips(hlo_text), strict=True):
        if not loop.innermost or not loop.trip_count or around is None or not _under_grad(loop):
            continue
        launched = len(loop.ops) * loop.trip_count * around
        totals["backward" if loop.backward else "forward"] += launched / time_steps
    return totals


def sequence_copies(hlo_text: str, time_steps: int) -> list[str]:
    """The ``copy`` instructions inside while loop bodies whose result is a ``[time_steps,
    ...]`` array: a loop that writes rows of an array in place (``rnnjax.cells._scan_rows``)
    where XLA could not keep the write in place copies the whole array every iteration.
    Returns their lines (empty: none)."""
    found = []
    for _, body in _while_loops(hlo_text):
        for _, opcode, line in body:
            shape = _COPY_SHAPE.search(line) if opcode == "copy" else None
            if shape and int(shape.group(1)) == time_steps:
                found.append(line.strip())
    return found


def launched_ops(hlo_text: str) -> int:
    """The ops one call of a compiled program launches: the entry computation's, each while
    loop's body times its trip count (the condition not counted, as in :func:`loop_ops`),
    the computations it calls (``call``; a ``conditional``'s largest branch). A fusion is
    one op. Comparable across unrolls: a scan unrolled fully launches its steps' ops from
    the entry computation, unrolled by u from a body of u steps run T / u times.
    Raises ValueError for a loop with no known trip count.
    """
    comps = computations(hlo_text)
    entry = next((m.group(1) for line in hlo_text.splitlines() if line.startswith("ENTRY")
                  for m in [_COMPUTATION.match(line)] if m), None)
    if entry is None:
        raise ValueError("no ENTRY computation in the module text")

    def count(name: str) -> int:
        total = 0
        for _, opcode, line in comps[name]:
            if opcode in FREE_OPCODES:
                continue
            if opcode == "while":
                trips = _TRIP_COUNT.search(line)
                if trips is None:
                    raise ValueError(f"while with no known trip count: {line.strip()[:200]}")
                total += int(trips.group(1)) * count(_body(line))
            elif opcode in ("call", "conditional"):
                names = [name.strip().lstrip("%") for match in _CALLED.finditer(line)
                         for name in (match.group(1) or match.group(2)).split(",")]
                if not names:
                    raise ValueError(f"{opcode} calling no computation: {line.strip()[:200]}")
                total += max(count(name) for name in names)
            else:
                total += 1
        return total

    return count(entry)


@dataclass(frozen=True)
class Size:
    """What a compiled program's compile time grows with (:func:`compiled_size`)."""

    instructions: int  # every computation's, fused computations' included
    per_step: float  # of them, in the loop bodies over time, per step a body runs


def compiled_size(hlo_text: str, unroll: int) -> Size:
    """The instructions of a compiled module text (every computation's, not counting those
    that launch nothing: ``FREE_OPCODES``), and how many of them its loops over time hold
    per step: the innermost while loops' bodies with every computation they call (fusions,
    reductions), divided by ``unroll``, the steps a body runs. A scan unrolled by u more
    steps holds about ``per_step * (u - unroll)`` instructions more. ``unroll`` 0: the scan
    is fully unrolled, and the loop left (K steps per call) is not one over time: no
    per-step instructions.
    """
    comps = computations(hlo_text)

    def size(name: str) -> int:
        return sum(op not in FREE_OPCODES for _, op, _ in comps[name])

    total = sum(size(name) for name in comps)
    if unroll == 0:
        return Size(total, 0.0)
    in_loops = 0
    for line, body in _while_loops(hlo_text):
        if any(op == "while" for _, op, _ in body):
            continue  # not innermost: a loop of K steps per call around the loops over time
        seen, todo = set(), [_body(line)]
        while todo:  # the body and what it calls, each computation once
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for _, _, instruction in comps[name]:
                for match in _CALLED.finditer(instruction):
                    todo += [n.strip().lstrip("%") for n in
                             (match.group(1) or match.group(2)).split(",")]
        in_loops += sum(size(name) for name in seen)
    return Size(total, in_loops / unroll)
