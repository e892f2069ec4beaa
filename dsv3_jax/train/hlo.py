"""Reading compiled HLO text: bytes moved by collectives per step, and data dependencies.

`jax.jit(f).lower(...).compile().as_text()` is one SPMD program (per device). Collectives inside a
while loop run once per iteration: XLA records `known_trip_count` on the loop, and
`collective_bytes` multiplies by it. Which branch of a conditional runs is not static: by default
every branch counts every time (an upper bound); the pipeline names its slots' branches
(`jax.named_scope`) and passes how often each runs.
Bytes are per device: the result shape of the collective (what it receives), except reduce-scatter,
whose operand is what it sends. XLA:CPU widens bf16 and fp8 collectives; `bytes` undoes that
(the dtype the program sends, as on GPU), `cpu_bytes` keeps it.

`Computation.depends(a, b)` answers "does instruction a (transitively) use b's result", the
question the two-micro-batch overlap test asks on CPU, where collectives are synchronous and there
is no schedule to inspect (`jax_kernels.md` §7.3).
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-reduce", "all-gather", "reduce-scatter",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def shape_bytes(type_str: str) -> float:
    """'f32[4,8]{1,0}' or a tuple of them -> bytes."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(type_str):
        size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * size
    return total


@dataclasses.dataclass
class Instruction:
    name: str
    type: str
    opcode: str
    operands: list[str]
    attrs: str
    line: str


def _split_instruction(rest: str):
    """'TYPE opcode(operands), attrs' -> type, opcode, operand text, attrs (balanced parens)."""
    i = 0
    if rest.startswith("("):  # tuple type
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        i += 1
    else:
        i = rest.index(" ")
    type_str, tail = rest[:i], rest[i:].lstrip()
    j = tail.index("(")
    opcode = tail[:j]
    depth = 0
    for k in range(j, len(tail)):
        depth += tail[k] == "("
        depth -= tail[k] == ")"
        if depth == 0:
            break
    return type_str, opcode, tail[j + 1:k], tail[k + 1:]


@dataclasses.dataclass
class Computation:
    name: str
    instructions: dict[str, Instruction]
    root: str | None = None

    def users(self) -> dict[str, list[str]]:
        out = defaultdict(list)
        for ins in self.instructions.values():
            for op in ins.operands:
                out[op].append(ins.name)
        return out

    def ancestors(self, name: str) -> set[str]:
        seen, stack = set(), [name]
        while stack:
            for op in self.instructions[stack.pop()].operands:
                if op in self.instructions and op not in seen:
                    seen.add(op)
                    stack.append(op)
        return seen

    def depends(self, a: str, b: str) -> bool:
        """Does instruction a use, directly or not, the result of instruction b?"""
        return b in self.ancestors(a)


def nested(comps: dict[str, Computation], ins: Instruction, seen: set | None = None) -> list[Instruction]:
    """The instruction and every instruction it runs: fusions, calls, loop bodies, branches."""
    seen = set() if seen is None else seen
    callees = [name for _, name in _CALLS.findall(ins.attrs)]
    for group in _BRANCHES.findall(ins.attrs):
        callees += re.findall(r"%([\w.\-]+)", group)
    out = [ins]
    for callee in callees:
        if callee in comps and callee not in seen:
            seen.add(callee)
            for inner in comps[callee].instructions.values():
                out += nested(comps, inner, seen)
    return out


def parse(text: str) -> tuple[dict[str, Computation], str]:
    """HLO module text -> computations by name, and the entry computation's name."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and "=" not in line.split("(")[0]:
                current = Computation(m.group(2), {})
                if m.group(1):
                    entry = current.name
            continue
        if line.strip() == "}":
            comps[current.name] = current
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            type_str, opcode, operands, attrs = _split_instruction(m.group(2))
            current.instructions[m.group(1)] = Instruction(
                m.group(1), type_str, opcode, re.findall(r"%([\w.\-]+)", operands), attrs, line)
            if line.lstrip().startswith("ROOT"):
                current.root = m.group(1)
    return comps, entry


def _executions(comps: dict[str, Computation], entry: str) -> dict[str, float]:
    """How many times each computation runs per call of the entry: loops by their known trip count,
    every branch of a conditional every time (an upper bound; `collective_bytes` weighs by scope)."""
    count: dict[str, float] = defaultdict(float)

    def visit(name: str, n: float):
        count[name] += n
        for ins in comps[name].instructions.values():
            trip = int(m.group(1)) if (m := _TRIP.search(ins.attrs)) else 1
            called = [c for kind, c in _CALLS.findall(ins.attrs) if kind != "to_apply"]
            for b in _BRANCHES.findall(ins.attrs):
                called += [c.strip().lstrip("%") for c in b.split(",")]
            for c in called:
                if c in comps:
                    visit(c, n * trip if ins.opcode == "while" else n)

    visit(entry, 1.0)
    return count


_FLOAT = re.compile(r"\b(bf16|f16|f32|f64|f8\w*)\[")


def _float_size(dtype: str) -> float:
    return 1 if dtype.startswith("f8") else _DTYPE_BYTES[dtype]


def _sent_bytes(comps, comp: Computation, name: str) -> float:
    """Bytes of operand `name` as the program meant to send it. XLA:CPU widens bf16 (to f32) and fp8
    (to f16) collectives: the operand is then a convert from the narrow type (or a fusion whose root
    is one, possibly followed by slices and bitcasts; e.g. quantize-to-fp8 then widen). Count the
    narrow type, as a GPU would send it."""
    ins = comp.instructions.get(name)
    if ins is None:
        return 0.0
    size = shape_bytes(ins.type)
    wide = _FLOAT.search(ins.type)
    where, conv = comp, ins
    if ins.opcode == "fusion":
        callee = re.search(r"calls=%([\w.\-]+)", ins.attrs)
        if callee and callee.group(1) in comps and comps[callee.group(1)].root:
            where = comps[callee.group(1)]
            conv = where.instructions[where.root]
    while conv.opcode in ("bitcast", "reshape", "copy", "transpose", "slice") and conv.operands \
            and conv.operands[0] in where.instructions:  # data movement after the widening convert
        conv = where.instructions[conv.operands[0]]
    if not wide or conv.opcode != "convert" or not conv.operands or conv.operands[0] not in where.instructions:
        return size
    narrow = _FLOAT.search(where.instructions[conv.operands[0]].type)
    if not narrow:
        return size
    return size * min(1.0, _float_size(narrow.group(1)) / _float_size(wide.group(1)))


def collective_bytes(text: str, scopes: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Compiled HLO text -> {opcode: {"count": executions per step, "bytes": bytes per device as the
    program sends them, "cpu_bytes": as this (CPU) executable moves them}}.

    Every branch of a conditional counts every time, unless `scopes` says otherwise: a collective
    traced under `jax.named_scope(s)` (its op_name holds "/s/") counts scopes[s] times as often, the
    fraction of the executions of its conditional that take that branch (the pipeline's slots:
    `pipeline.slot_weights`)."""
    comps, entry = parse(text)
    runs = _executions(comps, entry)
    scopes = scopes or {}
    out: dict[str, dict[str, float]] = {}
    for cname, comp in comps.items():
        for ins in comp.instructions.values():
            op = ins.opcode[:-6] if ins.opcode.endswith("-start") else ins.opcode
            if op not in COLLECTIVES or not runs.get(cname):
                continue
            operands = [o for o in ins.operands if o in comp.instructions]
            raw = sum(shape_bytes(comp.instructions[o].type) for o in operands)
            sent = sum(_sent_bytes(comps, comp, o) for o in operands)
            if op != "reduce-scatter":  # the others receive what their result holds
                result = shape_bytes(ins.type) / (2 if ins.opcode.endswith("-start") else 1)  # async: (in, out)
                sent, raw = (sent / raw * result if raw else result), result
            n = runs[cname] * next((w for s, w in scopes.items() if f"/{s}/" in ins.line), 1.0)
            rec = out.setdefault(op, {"count": 0, "bytes": 0.0, "cpu_bytes": 0.0})
            rec["count"] += n
            rec["bytes"] += n * sent
            rec["cpu_bytes"] += n * raw
    return out


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
