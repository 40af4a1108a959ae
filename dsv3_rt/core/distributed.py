"""Tensor and expert parallel runs over torch.distributed: process groups, launching ranks, and failure handling.

Layout (`resolve_layout`): on a world of W ranks, tp and ep each divide W and W = max(tp, ep). `--tp N`
alone means ep = tp = N, DeepSeek's demo layout; `--tp N --ep 1` keeps every expert on every rank; `--ep N`
alone keeps attention whole. See dsv3_rt/core/parallel.py for what each group splits.

Starting ranks, three ways, one code path: every rank reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT (`init_from_env`), whether torchrun set them (one or many machines) or `launch_command` /
`launch_local` did (local ranks as subprocesses).

Failures: a rank that dies closes its sockets, so its peers' next collective fails at once; a rank that hangs
makes its peers' collectives time out after DSV3RT_DIST_TIMEOUT seconds (default 300; loading has its own
DSV3RT_DIST_LOAD_TIMEOUT, default 3600); `collective_errors` turns either into a one-line DistributedError;
the local launchers stop every rank as soon as one exits with an error.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

from dsv3_rt.core.errors import Dsv3Error
from dsv3_rt.core.parallel import SINGLE, Parallel

ENV_TIMEOUT = "DSV3RT_DIST_TIMEOUT"
ENV_LOAD_TIMEOUT = "DSV3RT_DIST_LOAD_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_LOAD_TIMEOUT_S = 3600.0
STOP_GRACE_S = 10.0  # how long stopped ranks get to exit before they are killed
LEAD_STOP_S = 60.0  # `serve`: how long rank 0 gets to stop itself and its followers before they are killed


class DistributedError(Dsv3Error):
    """A parallel run cannot start, or one of its ranks failed."""


# --- layout ---------------------------------------------------------------------------------------------------
def resolve_layout(tp: int | None = None, ep: int | None = None, world: int | None = None) -> tuple[int, int, int]:
    """(tp, ep, world) from what the user gave. world: the number of ranks already started (torchrun), if any."""
    if tp is None:
        tp = world if (ep is None and world) else 1
    if ep is None:
        ep = tp
    if tp < 1 or ep < 1:
        raise DistributedError(f"--tp and --ep must be >= 1, got tp={tp} ep={ep}")
    need = max(tp, ep)
    if need % tp or need % ep:
        raise DistributedError(f"tp={tp} and ep={ep} do not fit one world: the smaller must divide the larger")
    if world is not None and world != need:
        raise DistributedError(f"{world} ranks were started but tp={tp}, ep={ep} needs {need}; "
                               "start max(tp, ep) ranks or change --tp/--ep")
    return tp, ep, need


def timeout_s(env: str = ENV_TIMEOUT, default: float = DEFAULT_TIMEOUT_S) -> float:
    raw = os.environ.get(env)
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise DistributedError(f"${env} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise DistributedError(f"${env} must be positive, got {raw!r}")
    return value


def backend_for(kernels_backend: str | None) -> str:
    """The torch.distributed backend a kernels backend declares for its collectives (gloo for CPU)."""
    from dsv3_rt.core.plugins import select_backend

    return select_backend(kernels_backend).capabilities.distributed_backend


# --- process groups -------------------------------------------------------------------------------------------
def make_parallel(tp: int, ep: int) -> Parallel:
    """This rank's Parallel for a (tp, ep) layout over the initialised world. Collective: every rank calls it
    with the same values. Groups use the collective timeout ($DSV3RT_DIST_TIMEOUT)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    tp, ep, _ = resolve_layout(tp, ep, world)
    step = timedelta(seconds=timeout_s())
    groups: dict[tuple[int, ...], Any] = {}

    def blocks(size: int) -> Any:
        """Groups of `size` consecutive ranks (every rank creates all of them, in order); this rank's one."""
        mine = None
        for start in range(0, world, size):
            ranks = tuple(range(start, start + size))
            if ranks not in groups:
                groups[ranks] = dist.new_group(list(ranks), timeout=step)
            if rank in ranks:
                mine = groups[ranks]
        return mine

    tp_group = blocks(tp) if tp > 1 else None
    ep_group = blocks(ep) if ep > 1 else None
    world_group = blocks(world)
    return Parallel(tp_rank=rank % tp, tp_size=tp, ep_rank=rank % ep, ep_size=ep, tp_group=tp_group,
                    ep_group=ep_group, rank=rank, world_size=world, world_group=world_group,
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(tp: int | None = None, ep: int | None = None, backend: str = "gloo", quiet: bool = True,
                  bind_device: Callable[[int], None] | None = None) -> Parallel:
    """Join the run described by RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (set by torchrun or by our
    launchers) and return this rank's Parallel; SINGLE when WORLD_SIZE is unset or 1.

    quiet: ranks other than 0 send stdout to /dev/null (only rank 0 prints; errors still reach stderr).
    bind_device: the kernels backend's `bind_local_device`, called with LOCAL_RANK before joining (a GPU
    backend picks its device there, so each rank's collectives use its own accelerator).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, ep, _ = resolve_layout(tp, ep, world)
    if world == 1:
        return SINGLE
    import torch.distributed as dist

    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; start ranks with torchrun or dsv3-rt run --tp N")
    rank = int(os.environ["RANK"])
    if bind_device is not None:
        bind_device(int(os.environ.get("LOCAL_RANK", "0")))
    if quiet and rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    try:
        # env:// reads MASTER_ADDR/PORT; under torchrun it joins the agent's store instead of binding the port again
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s(ENV_LOAD_TIMEOUT, DEFAULT_LOAD_TIMEOUT_S)))
        return make_parallel(tp, ep)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"rank {rank} of {world}: cannot join the run at {addr}:{port} ({_first_line(e)})") from e


_collective_failed = False  # set once a collective of this process failed: its process group is broken


def shutdown() -> None:
    """Leave the run (no-op when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_now_if_broken(code: int) -> int:
    """After a failed collective, end the process at once with `code`: tearing down a broken gloo group at
    interpreter exit can destroy a still-joinable worker thread, and std::terminate turns exit 1 into SIGABRT
    (seen in CI once in many runs). Otherwise return `code` for a normal exit."""
    if _collective_failed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


@contextlib.contextmanager
def collective_errors(parallel: Parallel) -> Iterator[None]:
    """Turn a failed collective (a peer died, hung past the timeout, or the network broke) into one line."""
    try:
        yield
    except Dsv3Error:
        raise
    except RuntimeError as e:
        import torch.distributed as dist

        if parallel.world_size == 1 or (not isinstance(e, dist.DistError) and "gloo" not in str(e).lower()):
            raise
        global _collective_failed
        _collective_failed = True
        raise DistributedError(
            f"rank {parallel.rank} of {parallel.world_size}: a collective failed because another rank stopped answering "
            f"(it exited, was killed, or took longer than ${ENV_TIMEOUT}={timeout_s():g}s): {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(e).__name__


# --- launching local ranks ------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_ranks(cmd: list[str], world: int, env: dict[str, str] | None = None, logs: Path | None = None,
                own_session: bool = False) -> list[subprocess.Popen]:
    """Start `world` local copies of `cmd` as ranks 0..world-1 of one run (torchrun's environment).

    logs: a folder for the stderr of ranks 1.. (rank{r}.log), so only rank 0 talks to the terminal.
    own_session: the ranks do not get the terminal's Ctrl-C; the launcher decides whom to signal."""
    base = {**os.environ, **(env or {}), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    # as torchrun does: ranks sharing a machine split its cores (oversubscribed ranks stall each collective)
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world)))
    procs = []
    for r in range(world):
        err = open(logs / f"rank{r}.log", "wb") if logs is not None and r > 0 else None  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=err,
                                      start_new_session=own_session))
        if err is not None:
            err.close()  # the child holds its own copy
    return procs


def supervise(procs: list[subprocess.Popen], poll_s: float = 0.05, lead: bool = False) -> tuple[int, int | None]:
    """Wait for every rank. When one exits with an error, stop the others and return (its code, its rank);
    (0, None) when all succeed. Ctrl-C stops every rank, then re-raises.

    lead: rank 0 leads the others (`serve`; start the ranks with own_session): Ctrl-C or SIGTERM on the launcher
    reach rank 0 alone, as SIGTERM (a second one as SIGINT: stop without waiting for requests); rank 0 stops the
    other ranks itself and the launcher waits for all of them. Ranks still running LEAD_STOP_S after the first
    signal, or after rank 0 exited, are killed."""
    asked: list[int] = []
    previous: dict[int, Any] = {}
    if lead and threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, lambda sig, _: asked.append(sig)) for s in (signal.SIGINT, signal.SIGTERM)}
    forwarded = 0
    deadline: float | None = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                # a rank killed by a signal is the cause; the others then fail in their next collective
                rank, code = min(failed, key=lambda rc: (rc[1] >= 0, rc[0]))
                stop(procs)
                return code, rank
            if all(c == 0 for c in codes):
                return 0, None
            if lead:
                now = time.monotonic()
                if len(asked) > forwarded and codes[0] is None:
                    with contextlib.suppress(ProcessLookupError):
                        procs[0].send_signal(signal.SIGTERM if not forwarded else signal.SIGINT)
                    forwarded = len(asked)
                if deadline is None and (forwarded or codes[0] is not None):
                    deadline = now + LEAD_STOP_S
                if deadline is not None and now > deadline:
                    late = next(r for r, c in enumerate(codes) if c is None)
                    stop(procs, signal.SIGKILL, grace_s=STOP_GRACE_S)  # followers ignore SIGTERM
                    return procs[late].returncode, late
            time.sleep(poll_s)
    except KeyboardInterrupt:
        stop(procs, signal.SIGINT)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop(procs: list[subprocess.Popen], sig: int = signal.SIGTERM, grace_s: float = STOP_GRACE_S) -> None:
    """Send `sig` to every running rank, then kill those still running after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def maybe_launch(argv: list[str], tp: int | None, ep: int | None, lead: bool = False) -> int | None:
    """For a CLI command given --tp/--ep: in a plain process that needs more than one rank, start the ranks
    (re-running `dsv3-rt *argv` in each) and return the exit code; None when this process should run the
    command itself (one rank, or a rank already started by torchrun or by us). lead: see `supervise`."""
    if "WORLD_SIZE" in os.environ:
        return None
    tp, ep, world = resolve_layout(tp, ep)
    if world == 1:
        return None
    return launch_command(argv, world, lead)


def launch_command(argv: list[str], world: int, lead: bool = False) -> int:
    """Run `dsv3-rt *argv` as `world` local ranks; an error in one rank stops all of them. Only rank 0 writes
    to the terminal; another rank's stderr is shown when that rank is the one that failed. lead: rank 0 stops
    the others (`serve`; see `supervise`)."""
    with tempfile.TemporaryDirectory(prefix="dsv3rt-logs-") as tmp:
        procs = start_ranks([sys.executable, "-m", "dsv3_rt", *argv], world, logs=Path(tmp), own_session=lead)
        code, rank = supervise(procs, lead=lead)
        if not code:
            return 0
        log = Path(tmp) / f"rank{rank}.log"
        if rank and log.is_file():
            for line in log.read_text(errors="replace").splitlines()[-20:]:
                print(f"[rank {rank}] {line}", file=sys.stderr)
    print(f"dsv3-rt: error: rank {rank} of {world} {describe_exit(code)}; stopped the other ranks", file=sys.stderr)
    return code if code > 0 else 1


def run_parallel(argv: list[str], tp: int | None, ep: int | None, kernels_backend: str | None,
                 body: Callable[[Parallel], int], lead: bool = False) -> int:
    """The CLI's way in: start local ranks if --tp/--ep ask for them (re-running `dsv3-rt *argv`), else join
    the run this process is a rank of (torchrun or our launcher), then `body(parallel)` with collective
    failures reported as one line. A plain single process just runs `body(SINGLE)`.
    lead: rank 0 stops the other ranks itself (`serve`); the local launcher forwards Ctrl-C/SIGTERM to it."""
    code = maybe_launch(argv, tp, ep, lead)
    if code is not None:
        return code
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        resolve_layout(tp, ep, 1)
        return body(SINGLE)
    from dsv3_rt.core.plugins import select_backend

    cls = select_backend(kernels_backend)
    par = init_from_env(tp, ep, cls.capabilities.distributed_backend, bind_device=cls.bind_local_device)
    with collective_errors(par):
        code = body(par)
    shutdown()
    return code


def launch_local(world: int, fn: Callable[..., Any], *args: Any, tp: int | None = None, ep: int | None = None,
                 backend: str = "gloo") -> list[Any]:
    """Run `fn(parallel, *args)` on `world` local ranks (subprocesses) and return each rank's result.

    fn and args are pickled by reference, so fn must be importable (a module-level function); the children
    get this process's sys.path. Raises DistributedError naming the first rank that failed.
    """
    with tempfile.TemporaryDirectory(prefix="dsv3rt-ranks-") as tmp:
        job = Path(tmp)
        procs = start_local(job, world, fn, *args, tp=tp, ep=ep, backend=backend)
        code, rank = supervise(procs)
        if code:
            err = job / f"error{rank}.txt"
            detail = err.read_text().strip() if err.is_file() else describe_exit(code)
            raise DistributedError(f"rank {rank} of {world} failed: {detail}")
        results = []
        for r in range(world):
            with open(job / f"result{r}.pkl", "rb") as f:
                results.append(pickle.load(f))
        return results


def start_local(job: Path, world: int, fn: Callable[..., Any], *args: Any, tp: int | None = None,
                ep: int | None = None, backend: str = "gloo") -> list[subprocess.Popen]:
    """Start the ranks of `launch_local` without waiting (tests use it to kill one rank)."""
    with open(job / "job.pkl", "wb") as f:
        pickle.dump((fn, args, tp, ep, backend), f)
    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    cmd = [sys.executable, "-c", "import sys; from dsv3_rt.core.distributed import _child; sys.exit(_child(sys.argv[1]))", str(job)]
    return start_ranks(cmd, world, env)


def _child(job_dir: str) -> int:
    """One rank of `launch_local`: join, run the job, leave its result (or its error) in the job folder."""
    job = Path(job_dir)
    rank = int(os.environ["RANK"])
    par = SINGLE
    try:
        with open(job / "job.pkl", "rb") as f:
            fn, args, tp, ep, backend = pickle.load(f)
        par = init_from_env(tp, ep, backend)
        with collective_errors(par):
            result = fn(par, *args)
        with open(job / f"result{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
        shutdown()
        return 0
    except KeyboardInterrupt:
        return 130
    except BaseException as e:  # noqa: BLE001 - report any failure of the job to the launcher, in one line
        msg = str(e) if isinstance(e, Dsv3Error) else f"{type(e).__name__}: {_first_line(e)}"
        (job / f"error{rank}.txt").write_text(msg)
        print(f"dsv3-rt: rank {rank}: error: {msg}", file=sys.stderr)
        if not isinstance(e, Dsv3Error):
            traceback.print_exc()
        return exit_now_if_broken(1)
