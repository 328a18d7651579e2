"""Where a training step's memory and compile time go, from XLA's own accounting of the step.

  python -m benchmarks.memory_accounting [--case distill_shufflenet_2.0_0.5_dfa] [--batch 128]
      [--dtype float32] [--devices 1] [--compare-wrn] [--top 25] [--hlo-dir DIR]
      [--aggregation platform|reduction|chain]

Builds the case's step and state as `benchmarks/throughput.py` does (its `build_case`), lowers
and compiles it ahead of time, and prints:
  * trace/lower and compile seconds;
  * `compiled.memory_analysis()` (argument, output, alias, temp, generated code, in MiB) and the
    state's parameter / optimizer bytes;
  * on an accelerator, the device's peak memory after the compile alone (what the compiler's
    autotuning allocated) and after one step, to set against `temp`;
  * from the optimised, scheduled HLO (`compiled.as_text()`): every buffer the entry computation
    defines, by kind (convolutions dense / depthwise, layout copies and transposes, concatenates,
    elementwise fusions, ...) with counts and bytes; then a liveness walk over the schedule
    (a buffer lives from its definition to its last use, bitcasts / tuples / get-tuple-elements
    alias their operand) that finds the peak and breaks the buffers live there down by owner
    (the teacher's forward: no dependence on the trained state; the student's forward; the
    backward pass) and by kind, with the largest of them.
The liveness walk ignores XLA's in-place reuse of an operand's buffer (which it overcounts) and
the packing of the temp allocation (whose gaps `temp` includes), so its peak lands near `temp`
without bounding it (ShuffleNetV2's: 653 against 662 MiB); it says *what* is live, not how much.

The last line is a JSON summary. `--compare-wrn` also accounts `distill_pair3_dfa` (WRN_28_4 ->
WRN_16_2) for comparison. One CPU device by default: the per-device program a single GPU runs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import time

MIB = 2**20
DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
# Ops that define no buffer of their own: their value is (part of) an operand's.
ALIASING = {"bitcast", "get-tuple-element", "tuple", "parameter", "constant"}
_ARRAY = re.compile(r"\b(pred|[sfu]\d+|bf16)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_OPERAND = re.compile(r"%([\w.\-]+)")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (a tuple's: the sum of its arrays)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * DTYPE_BYTES.get(dtype, 4)
    return total


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    text: str

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.text)
        return m.group(1) if m else ""


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
    """Optimised HLO text -> ({computation: its instructions in order}, the entry's name)."""
    comps: dict[str, list[Instr]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _COMP.match(line)
            if m:
                current = m.group(1)
                comps[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            _, name, shape, opcode, rest = m.groups()
            # Operands: up to the call's closing parenthesis (attributes follow it).
            depth, end = 1, len(rest)
            for i, ch in enumerate(rest):
                depth += ch == "("
                depth -= ch == ")"
                if depth == 0:
                    end = i
                    break
            operands = _OPERAND.findall(rest[:end])
            comps[current].append(Instr(name, shape, opcode, operands, line))
    return comps, entry


def _fused_opcodes(instr: Instr, comps) -> set[str]:
    """The opcodes inside a fusion (one level of nesting followed)."""
    m = re.search(r"calls=%([\w.\-]+)", instr.text)
    if not m or m.group(1) not in comps:
        return set()
    ops = set()
    for inner in comps[m.group(1)]:
        ops.add(inner.opcode)
        if inner.opcode == "convolution":
            groups = re.search(r"feature_group_count=(\d+)", inner.text)
            ops.add("depthwise" if groups and int(groups.group(1)) > 1 else "dense_conv")
        if inner.opcode == "fusion":
            ops |= _fused_opcodes(inner, comps)
    return ops


def kind_of(instr: Instr, comps) -> str:
    """What a buffer-defining entry instruction is, for the breakdown."""
    ops = {instr.opcode}
    if instr.opcode == "convolution":
        groups = re.search(r"feature_group_count=(\d+)", instr.text)
        ops.add("depthwise" if groups and int(groups.group(1)) > 1 else "dense_conv")
    if instr.opcode == "fusion":
        ops |= _fused_opcodes(instr, comps)
    if "depthwise" in ops:
        return "convolution, depthwise (feature_group_count > 1)"
    if "dense_conv" in ops:
        return "convolution, dense (1x1 / 3x3)"
    if "dot" in ops:
        return "dot"
    if "concatenate" in ops:
        return "concatenate (fused)"
    if "transpose" in ops:
        return "transpose (fused)"
    if "copy" in ops and instr.opcode == "copy":
        return "copy (layout change)"
    if "copy" in ops:
        return "copy (fused, layout change)"
    if "reduce-window" in ops:
        return "reduce-window (pooling)"
    if "reduce" in ops:
        return "reduce (BN statistics, sums)"
    if "slice" in ops or "dynamic-slice" in ops:
        return "slice (fused)"
    if instr.opcode in ("while", "call"):
        return "while / call (random bits)"
    return "elementwise fusion" if instr.opcode == "fusion" else instr.opcode


def account(text: str, top: int = 25) -> dict:
    """The buffer breakdown and liveness peak of an optimised, scheduled HLO module's entry."""
    comps, entry = parse_hlo(text)
    instrs = comps[entry]
    by_name = {i.name: i for i in instrs}
    # Each value's underlying buffers (aliasing ops resolve to their operands' buffers).
    buffers: dict[str, tuple[str, ...]] = {}
    for i in instrs:
        if i.opcode in ("get-tuple-element", "tuple", "bitcast"):
            buffers[i.name] = tuple(b for o in i.operands for b in buffers.get(o, ()))
        elif i.opcode in ("parameter", "constant"):
            buffers[i.name] = ()
        else:
            buffers[i.name] = (i.name,)
    # Owner: the teacher's forward depends on no trained parameter (argument 0's `params`; the
    # state's step and random key feed the augmentation, which the teacher's input depends on).
    state_params = {
        i.name for i in instrs if i.opcode == "parameter" and "args_0__params" in i.name
    }
    on_state: set[str] = set(state_params)
    for i in instrs:
        if any(o in on_state for o in i.operands):
            on_state.add(i.name)

    def owner(i: Instr) -> str:
        if "transpose(" in i.op_name:
            return "backward pass"
        if i.name not in on_state:
            return "teacher forward (frozen, no gradient)"
        return "student forward and losses"

    last_use = {}
    for t, i in enumerate(instrs):
        for o in i.operands:
            for b in buffers.get(o, ()):
                last_use[b] = t
    end = len(instrs)
    root = instrs[-1]
    for o in root.operands:  # The outputs live to the end.
        for b in buffers.get(o, ()):
            last_use[b] = end
    defined = {i.name: t for t, i in enumerate(instrs) if buffers[i.name] == (i.name,)}
    sizes = {n: shape_bytes(by_name[n].shape) for n in defined}
    kinds = {n: kind_of(by_name[n], comps) for n in defined}

    all_kinds: dict[str, list] = collections.defaultdict(lambda: [0, 0])
    for n in defined:
        all_kinds[kinds[n]][0] += 1
        all_kinds[kinds[n]][1] += sizes[n]

    # Sweep: +size at definition, -size after the last use.
    delta = [0] * (end + 2)
    for n, t in defined.items():
        delta[t] += sizes[n]
        delta[last_use.get(n, t) + 1] -= sizes[n]
    live, peak, peak_t = 0, 0, 0
    for t in range(end + 1):
        live += delta[t]
        if live > peak:
            peak, peak_t = live, t
    at_peak = [n for n, t in defined.items() if t <= peak_t <= last_use.get(n, t)]
    by_owner: dict[str, list] = collections.defaultdict(lambda: [0, 0])
    by_kind: dict[str, list] = collections.defaultdict(lambda: [0, 0])
    for n in at_peak:
        for table, key in ((by_owner, owner(by_name[n])), (by_kind, kinds[n])):
            table[key][0] += 1
            table[key][1] += sizes[n]
    largest = sorted(at_peak, key=lambda n: -sizes[n])[:top]
    return {
        "instructions": end,
        "computations": len(comps),
        "fusions": sum(i.opcode == "fusion" for i in instrs),
        "buffers": len(defined),
        "buffers_mib": sum(sizes.values()) / MIB,
        "all_kinds": dict(all_kinds),
        "peak_mib": peak / MIB,
        "peak_at": f"{peak_t}/{end} ({by_name[instrs[peak_t].name].op_name[:100]})",
        "peak_by_owner": dict(by_owner),
        "peak_by_kind": dict(by_kind),
        "peak_largest": [
            (sizes[n] / MIB, by_name[n].shape.split("{")[0], kinds[n], by_name[n].op_name)
            for n in largest
        ],
    }


def _table(title: str, rows: dict) -> None:
    print(f"  {title}:")
    for key, (count, size) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        print(f"    {size / MIB:9.1f} MiB  {count:5d}  {key}")


def _tree_mib(tree) -> float:
    import jax  # pylint: disable=g-import-not-at-top

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / MIB


def _device_mib(device, key: str) -> float | None:
    """`device.memory_stats()[key]` in MiB; None where the device keeps no statistics (CPU)."""
    stats = device.memory_stats() or {}
    return stats[key] / MIB if key in stats else None


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def account_case(
    case: str, mesh, batch: int, dtype: str, top: int, hlo_dir: str | None = None
) -> dict:
    """Builds, lowers and compiles `case`'s step and prints its accounting; returns the summary."""
    from benchmarks import throughput  # pylint: disable=g-import-not-at-top

    start = time.perf_counter()
    runner = throughput.build_case(case, mesh, batch, dtype)["step"]
    build_s = time.perf_counter() - start
    state = runner.make_state()
    params_mib = _tree_mib(getattr(state, "params", {}))
    opt_mib = _tree_mib(getattr(state, "opt_state", {}))
    state_mib = _tree_mib(state)
    start = time.perf_counter()
    lowered = runner.fn.lower(state, *runner.args)
    trace_s = time.perf_counter() - start
    device = mesh.devices.flat[0]
    in_use_before = _device_mib(device, "bytes_in_use")
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    # On an accelerator: the device's peak after the compile alone (what autotuning allocated)
    # and after one step (the step's buffers), to set against `temp`. None on the CPU.
    peak_compile = _device_mib(device, "peak_bytes_in_use")
    peak_step = None
    if peak_compile is not None:
        import jax  # pylint: disable=g-import-not-at-top

        jax.block_until_ready(compiled(state, *runner.args))
        peak_step = _device_mib(device, "peak_bytes_in_use")
    text = compiled.as_text()
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, f"{case}.hlo.txt"), "w") as f:
            f.write(text)
    acc = account(text, top)

    print(f"\n== {case} (batch {batch}, {dtype}, {len(mesh.devices.flat)} device(s))")
    print(f"  build {build_s:.1f} s, trace+lower {trace_s:.1f} s, compile {compile_s:.1f} s")
    print("  memory_analysis (MiB):")
    fields = ("argument", "output", "alias", "temp", "generated_code")
    for field in fields:
        print(f"    {field:15s} {getattr(mem, f'{field}_size_in_bytes') / MIB:9.1f}")
    if peak_compile is not None:
        print(
            f"  device memory (MiB): in use before the compile {in_use_before:.1f}, peak after the"
            f" compile {peak_compile:.1f}, peak after one step {peak_step:.1f}"
        )
    print(
        f"  state: params {params_mib:.1f} MiB, optimizer {opt_mib:.1f} MiB, whole state"
        f" {state_mib:.1f} MiB"
    )
    print(
        f"  HLO entry: {acc['instructions']} instructions, {acc['fusions']} fusions,"
        f" {acc['computations']} computations; {acc['buffers']} buffers defined,"
        f" {acc['buffers_mib']:.0f} MiB in all"
    )
    _table("every buffer the entry defines, by kind (MiB, count)", acc["all_kinds"])
    print(f"  liveness peak {acc['peak_mib']:.1f} MiB at instruction {acc['peak_at']}")
    _table("live at the peak, by owner", acc["peak_by_owner"])
    _table("live at the peak, by kind", acc["peak_by_kind"])
    print(f"  the {top} largest buffers live at the peak:")
    for size, shape, kind, op_name in acc["peak_largest"]:
        print(f"    {size:7.2f} MiB  {shape:24s} {kind:34s} {op_name[-70:]}")
    return {
        "case": case,
        "batch": batch,
        "dtype": dtype,
        "trace_s": round(trace_s, 2),
        "compile_s": round(compile_s, 2),
        **{f"{f}_mib": round(getattr(mem, f"{f}_size_in_bytes") / MIB, 1) for f in fields},
        "device_peak_after_compile_mib": _rounded(peak_compile),
        "device_peak_after_step_mib": _rounded(peak_step),
        "params_mib": round(params_mib, 1),
        "opt_state_mib": round(opt_mib, 1),
        "hlo_instructions": acc["instructions"],
        "hlo_fusions": acc["fusions"],
        "liveness_peak_mib": round(acc["peak_mib"], 1),
        "peak_by_owner_mib": {k: round(v[1] / MIB, 1) for k, v in acc["peak_by_owner"].items()},
    }


def _use_aggregation(form: str) -> None:
    """Makes `losses.aggregate` (read by the steps as they are traced) use `form` everywhere."""
    import functools  # pylint: disable=g-import-not-at-top

    from dfa_jax import losses  # pylint: disable=g-import-not-at-top

    losses.aggregate = functools.partial(losses.aggregate, form=form)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="distill_shufflenet_2.0_0.5_dfa")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--devices", type=int, default=1, help="JAX CPU devices")
    parser.add_argument("--compare-wrn", action="store_true", help="also distill_pair3_dfa")
    parser.add_argument("--top", type=int, default=25, help="largest buffers to list")
    parser.add_argument("--hlo-dir", default=None, help="also write each optimised HLO here")
    parser.add_argument(
        "--aggregation",
        default="platform",
        choices=("platform", "reduction", "chain"),  # losses.dfa.AGGREGATION_FORMS
        help="Eq. 2's form: the one losses.aggregate picks for the platform, or this one everywhere",
    )
    args = parser.parse_args(argv)

    from dfa_jax import parallel  # pylint: disable=g-import-not-at-top

    parallel.configure_cpu_devices(args.devices)
    import jax  # pylint: disable=g-import-not-at-top

    from benchmarks import throughput  # pylint: disable=g-import-not-at-top

    if args.aggregation != "platform":
        _use_aggregation(args.aggregation)
    mesh = parallel.make_mesh()
    print(f"# cpu: {throughput.cpu_model()} ({os.cpu_count()} cores)")
    print(f"# aggregation: {args.aggregation}")
    print(f"# jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices)")
    cases = [args.case] + (["distill_pair3_dfa"] if args.compare_wrn else [])
    records = [account_case(c, mesh, args.batch, args.dtype, args.top, args.hlo_dir) for c in cases]
    print()
    for record in records:
        print(json.dumps(record))
    return records


if __name__ == "__main__":
    main()
