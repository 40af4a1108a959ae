"""Run the conformance cases against one backend class and classify each result into a Record.

Statuses: pass, fallback (the op is not in the backend's `capabilities.ops` and not overridden: the
reference runs it), skip (a declared capability excludes the case), xfail / xpass (the backend's own
`conformance_xfail` list), mismatch (numbers outside tolerance), error (an exception). Failing: mismatch,
error, xpass. Skips come only from declared capabilities or the backend's probe, never from device names.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable, Union

import torch

from dsv3_rt.conformance.cases import OpCase, greedy_step_replay, op_cases, prepare, to_cpu
from dsv3_rt.conformance.model_cases import ModelCase, load_model, model_cases, reference_twin
from dsv3_rt.conformance.distributed import distributed_cases
from dsv3_rt.conformance.quality import quality_cases
from dsv3_rt.conformance.tolerances import (MODEL_TOLERANCES, OP_TOLERANCES, QUANT_TOLERANCES, Comparison, Tolerance,
                                            compare, matches, tolerance_for)
from dsv3_rt.core.kernels import API_VERSION, DTYPES, OPS, Availability, Kernels, fallback_ops, overridden_ops

STATUSES = ("pass", "fallback", "skip", "xfail", "xpass", "mismatch", "error")
FAILING = frozenset({"mismatch", "error", "xpass"})

Case = Union[OpCase, ModelCase, "CapabilitiesCase"]


@dataclass(frozen=True)
class CapabilitiesCase:
    """The backend's declarations themselves: consistent with its code and with the interface."""

    op: str = "capabilities"
    dtype: str = "any"
    shape: str = "-"

    @property
    def id(self) -> str:
        return "capabilities[declared]"


@dataclass
class Record:
    backend: str
    backend_version: str
    device: str
    op: str
    case: str
    dtype: str
    shape: str
    status: str
    max_abs: float | None = None
    max_rel: float | None = None
    atol: float | None = None
    rtol: float | None = None
    tolerance_reason: str = ""
    message: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("max_abs", "max_rel"):  # JSON has no inf
            if d[key] is not None and d[key] == float("inf"):
                d[key] = None
        return d


def all_cases() -> list[Case]:
    """Every case of the suite, in a fixed order: the declarations, the ops, then the tiny model."""
    return [CapabilitiesCase(), *op_cases(), *model_cases(), *quality_cases(), *distributed_cases()]


class Suite:
    """The conformance suite bound to one backend class (registered through a plugin or not)."""

    def __init__(self, backend: type[Kernels], version: str = "unregistered", device: str | None = None) -> None:
        self.cls = backend
        self.version = version
        self.availability = _probe(backend)
        self.device = device if device is not None else _device_name(backend, self.availability)
        self._kernels: dict[str, Kernels] = {}
        self._models: dict[tuple[str, str], Any] = {}

    # --- cases -------------------------------------------------------------------------------------------
    def cases(self, select: Callable[[Case], bool] | None = None) -> list[Case]:
        cases = all_cases()
        return [c for c in cases if select(c)] if select else cases

    def run(self, select: Callable[[Case], bool] | None = None, on_record: Callable[[Record], None] | None = None) -> list[Record]:
        records = []
        for c in self.cases(select):
            records.append(self.run_case(c))
            if on_record:
                on_record(records[-1])
        return records

    def run_case(self, c: Case) -> Record:
        start = time.perf_counter()
        rec = Record(self.cls.name, self.version, self.device, c.op, c.id, c.dtype, c.shape, "pass")
        try:
            self._classify(c, rec)
        except Exception as e:  # noqa: BLE001 - a backend exception is a result ("error"), not a crash of the suite
            rec.status, rec.message = "error", _describe(e)
        xfail = self._xfail_reason(c.id)
        if xfail is not None and rec.status in ("pass", "mismatch", "error"):
            rec.status, rec.message = ("xpass", f"passes but is listed in conformance_xfail ({xfail}): remove the entry") \
                if rec.status == "pass" else ("xfail", f"{xfail} | {rec.message}")
        rec.seconds = round(time.perf_counter() - start, 4)
        return rec

    # --- internals ---------------------------------------------------------------------------------------
    def _classify(self, c: Case, rec: Record) -> None:
        if isinstance(c, CapabilitiesCase):
            problems = self.declaration_problems()
            if problems:
                rec.status, rec.message = "error", "; ".join(problems)
            return
        if not self.availability.ok:
            rec.status, rec.message = "skip", f"backend not available here: {self.availability.reason}"
            return
        caps = self.cls.capabilities
        if isinstance(c, OpCase) and c.default_dtype:
            load_dtype = caps.dtypes[0]
        else:
            load_dtype = c.dtype
            if c.dtype not in caps.dtypes:
                rec.status, rec.message = "skip", f"dtype {c.dtype!r} not in capabilities.dtypes {caps.dtypes}"
                return
        if isinstance(c, OpCase) and c.op in fallback_ops(self.cls) and c.op not in overridden_ops(self.cls):
            rec.status, rec.message = "fallback", "not in capabilities.ops: the reference kernels run it"
            return
        if isinstance(c, ModelCase):
            devices = self.cls.local_device_count() if c.ranks > 1 else None
            if devices is not None and devices < c.ranks:
                rec.status, rec.message = "skip", f"needs {c.ranks} local devices (one per rank); this machine has {devices}"
                return
            tol = tolerance_for(self.cls, c.op, c.dtype, MODEL_TOLERANCES)
            result = c.run(self._model("backend", load_dtype), lambda: self._model("reference", load_dtype), tol)
        else:
            tol, result = self._run_op(c, load_dtype)
        rec.atol, rec.rtol, rec.tolerance_reason = tol.atol, tol.rtol, tol.reason
        rec.max_abs, rec.max_rel, rec.message = result.max_abs, result.max_rel, result.message
        if not result.ok:
            rec.status = "mismatch"

    def _run_op(self, c: OpCase, load_dtype: str) -> tuple[Tolerance, Comparison]:
        k = self._instance(load_dtype)
        raw = c.make(c.generator(), c.dtype)
        args = prepare(k, raw)
        actual = c.call(k, args)
        if c.check == "quant":
            q = tolerance_for(self.cls, c.op, c.dtype, QUANT_TOLERANCES)
            amax = float(raw["source"].abs().max())
            tol = Tolerance(q.atol * amax, 0.0, q.reason)
            return tol, compare(actual, [raw["source"]], tol)
        ref = Kernels(dtype=load_dtype, device="cpu")
        ref_args = to_cpu(args)
        table = MODEL_TOLERANCES if c.check in ("layers", "greedy_step") else OP_TOLERANCES
        tol = tolerance_for(self.cls, c.op, c.dtype, table)
        if c.check == "argmax":  # (these two compare against logits, not the reference's call)
            return tol, _compare_argmax(actual[0], ref.linear(ref_args["hidden"], ref_args["head"]).float(), tol)
        if c.check == "greedy_step":
            return tol, _compare_greedy_step(actual, ref, ref_args, tol)
        expected = c.call(ref, ref_args)
        if c.check == "routing":
            return tol, _compare_routing(actual, expected, tol)
        if c.check == "sample":
            return tol, _compare_samples(actual[0], expected[0], ref, ref_args)
        dtype_problem = _dtype_problem(actual, expected, k, ref)
        if dtype_problem:
            return tol, Comparison(False, float("inf"), float("inf"), dtype_problem)
        return tol, compare(actual, expected, tol)

    def _instance(self, dtype: str) -> Kernels:
        if dtype not in self._kernels:
            self._kernels[dtype] = self.cls(dtype=dtype)
        return self._kernels[dtype]

    def _model(self, side: str, dtype: str) -> Any:
        if (side, dtype) not in self._models:
            backend = self._models.get(("backend", dtype)) or load_model(self._instance(dtype))
            self._models[("backend", dtype)] = backend
            self._models[("reference", dtype)] = reference_twin(backend)
        return self._models[(side, dtype)]

    def _xfail_reason(self, case_id: str) -> str | None:
        for pattern, reason in getattr(self.cls, "conformance_xfail", {}).items():
            if matches(pattern, case_id):
                return reason
        return None

    def declaration_problems(self) -> list[str]:
        """What is wrong with the backend's declared identity and capabilities (empty: nothing)."""
        cls, caps, out = self.cls, self.cls.capabilities, []
        if cls.api_version != API_VERSION:
            out.append(f"api_version {cls.api_version} != {API_VERSION}")
        unknown = [op for op in caps.ops if op not in OPS]
        if unknown:
            out.append(f"capabilities.ops names ops the interface does not have: {unknown}")
        undeclared = [op for op in overridden_ops(cls) if op not in caps.ops]
        if undeclared:
            out.append(f"overrides {undeclared} without declaring them in capabilities.ops (reports would call them fallbacks)")
        bad_dtypes = [d for d in caps.dtypes if d not in DTYPES]
        if bad_dtypes or not caps.dtypes:
            out.append(f"capabilities.dtypes must be a non-empty subset of {DTYPES}; has {caps.dtypes}")
        if not caps.compute_dtypes or any(not isinstance(getattr(torch, d, None), torch.dtype) for d in caps.compute_dtypes):
            out.append(f"capabilities.compute_dtypes must name torch dtypes; has {caps.compute_dtypes}")
        if not caps.distributed_backend:
            out.append("capabilities.distributed_backend is empty")
        for key, tol in getattr(cls, "conformance_tolerances", {}).items():
            if not isinstance(tol, Tolerance) or not tol.reason.strip() or tol.reason.startswith("default"):
                out.append(f"conformance_tolerances[{key!r}] needs a Tolerance with a stated reason")
        ids = [c.id for c in all_cases()]
        for pattern, reason in getattr(cls, "conformance_xfail", {}).items():
            if not str(reason).strip():
                out.append(f"conformance_xfail[{pattern!r}] has no reason")
            if not any(matches(pattern, i) for i in ids):
                out.append(f"conformance_xfail[{pattern!r}] matches no case (stale entry)")
        if self.availability.reason.startswith("probe() "):
            out.append(f"{self.availability.reason}: it must return an Availability and never raise")
        return out


def _probe(cls: type[Kernels]) -> Availability:
    try:
        result = cls.probe()
    except Exception as e:  # noqa: BLE001 - reported by the capabilities case
        return Availability(False, f"probe() raised {_describe(e)}")
    return result if isinstance(result, Availability) else Availability(False, f"probe() returned {type(result).__name__}")


def _device_name(cls: type[Kernels], availability: Availability) -> str:
    if not availability.ok:
        return f"unavailable ({cls.device_type})"
    try:
        return cls.device_name()
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__})"


def _describe(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" at {where.filename.rsplit('/', 1)[-1]}:{where.lineno}" if where else ""
    return f"{type(e).__name__}: {e}{at}".replace("\n", " ")


def _dtype_problem(actual: list[torch.Tensor], expected: list[torch.Tensor], k: Kernels, ref: Kernels) -> str:
    if k.compute_dtype != ref.compute_dtype:
        return ""  # the backend computes in another dtype by declaration; values are still compared
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a.dtype != e.dtype:
            return f"output {i}: dtype {a.dtype}, the interface returns {e.dtype}"
    return ""


def _compare_routing(actual: list[torch.Tensor], expected: list[torch.Tensor], tol: Tolerance) -> Comparison:
    """The same experts per token (in any order; ties go to the lower id) with the same weights."""
    (wa, ia), (we, ie) = actual, expected
    if tuple(ia.shape) != tuple(ie.shape):
        return Comparison(False, float("inf"), float("inf"), f"ids shape {tuple(ia.shape)}, expected {tuple(ie.shape)}")
    ia, oa = ia.cpu().long().sort(-1)
    ie, oe = ie.cpu().long().sort(-1)
    wrong = (ia != ie).any(-1)
    if bool(wrong.any()):
        t = int(wrong.nonzero()[0])
        return Comparison(False, float("inf"), float("inf"),
                          f"different experts for {int(wrong.sum())} of {len(wrong)} tokens (token {t}: {ia[t].tolist()} vs {ie[t].tolist()})")
    return compare([wa.cpu().float().gather(-1, oa)], [we.float().gather(-1, oe)], tol)


def _compare_argmax(got: torch.Tensor, logits: torch.Tensor, tol: Tolerance) -> Comparison:
    """Each row's id has the reference's largest logit of that row, up to the tolerance (a near-tie may go either way)."""
    got = got.cpu().long()
    if got.shape != logits.shape[:1]:
        return Comparison(False, float("inf"), float("inf"), f"shape {tuple(got.shape)}, expected ({logits.shape[0]},)")
    top = logits.max(dim=-1).values
    short = top - logits.gather(1, got[:, None])[:, 0]  # how far each pick falls below its row's max
    worst = int(short.argmax())
    ok = bool((short <= tol.atol + tol.rtol * top.abs()).all())
    return Comparison(ok, float(short.max()), float(short[worst] / top[worst].abs().clamp(min=1e-30)),
                      "" if ok else f"row {worst}: token {int(got[worst])} is {float(short[worst]):.3g} below the max")


def _compare_greedy_step(got: list[torch.Tensor], ref: Kernels, args: dict[str, Any], tol: Tolerance) -> Comparison:
    """Per step (tokens, drafts, stream): the tokens pick the reference's largest logits and the drafts those of the
    reference's MTP module fed the backend's own tokens, up to the tolerance (`_compare_argmax`), and the stream is
    that MTP module's within twice the tolerance: it has been through three roundings (the main layer, mtp_project
    and the MTP layer; the cpu backend's int8 reached 0.36 on values up to 4.2)."""
    want = greedy_step_replay(ref, args, got[0::3])
    wide = Tolerance(2 * tol.atol, 2 * tol.rtol, tol.reason)
    for i in range(0, len(got), 3):
        for result in (_compare_argmax(got[i], want[i], tol), _compare_argmax(got[i + 1], want[i + 1], tol),
                       compare([got[i + 2]], [want[i + 2]], wide)):
            if not result.ok:
                return Comparison(False, result.max_abs, result.max_rel, f"step {i // 3 + 1}: {result.message}")
    return compare(got[2::3], want[2::3], wide)


def _compare_samples(got: torch.Tensor, want: torch.Tensor, ref: Kernels, args: dict[str, Any]) -> Comparison:
    """Equal tokens, except where the uniform draw sits on a CDF boundary of the reference distribution."""
    got = got.cpu().long()
    probs = ref.sampling_probs(args["logits"], args["temperature"], args["top_k"], args["top_p"])
    cdf = probs.cumsum(-1)
    for b in (got != want).nonzero().flatten().tolist():
        t, u = int(got[b]), float(args["uniform"][b]) * float(cdf[b, -1])
        lo = float(cdf[b, t - 1]) if t > 0 else 0.0
        if not (probs[b, t] > 0 and lo - 1e-6 <= u <= float(cdf[b, t]) + 1e-6):
            return Comparison(False, float("inf"), float("inf"), f"row {b}: token {t}, reference {int(want[b])}")
    return Comparison(True, 0.0, 0.0)
