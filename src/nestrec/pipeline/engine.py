"""``NestPipeEngine``: one training step of a row-sharded model, under one of four schedules.

``sync``    the reference: the data plane's stages (:mod:`nestrec.sharding.dataplane`) inline,
            one after the other, nothing overlapped — what ``ShardedEmbeddingCollection.forward``
            + ``apply_sparse_updates`` compute, through the same functions.
``dbp``     Dual-Buffer Pipelining: key routing (stage 3) of batch t+2 on the ``router`` thread
            and row retrieval (stage 4) of batch t+1 on the ``retrieval`` thread run while batch t
            computes; a dual-buffer copy after t's update makes t+1's prefetched rows exact.
``fwp``     Frozen-Window Pipelining: the batch is split into N micro-batches; the row All2All
            of micro-batch i+1 and the gradient All2All of micro-batch i run on the ``comm``
            thread while micro-batch i computes. Parameters stay frozen inside the window.
``nested``  DBP with FWP inside stage 5: the paper's NestPipe.

Whatever the schedule, a batch ends with exactly one sparse update (on the summed per-row
gradient) and one dense all-reduce + optimizer step, and the loss is normalised by the full
local batch: the parameters equal ``sync``'s up to summation order (tests check ≤ 1e-10).

Ordering rules that keep DBP exact (design brief §3.3), each enforced here:

* the dual-buffer copy runs after the batch's update and before the next batch's forward;
* the write-back of batch t is queued on the retrieval thread *before* the retrieval of batch
  t+2, so rows in B(t) ∩ B(t+2) \\ B(t+1) are read after they were written (FIFO thread order);
* the retrieval depth is 2 (one batch ahead): one intersection copy is then enough.

``dual_buffer_copy=False`` and ``writeback_ordering=False`` exist only as negative controls:
each deterministically breaks exactness, which is how the tests prove they detect staleness.

The dual buffer exists because rows are *copied* ahead of use (host shards, device buffers).
When the shards sit on the compute device (CPU training, ``storage=device``) a copy would only
cost memory bandwidth: ``dbp`` and ``nested`` then read the shards in place when the rows are
sent — after the previous batch's update — and only key routing runs ahead (the copy path stays
tested on CPU through a collection that refuses direct buffers).

Stages off the main thread run on *lanes* (:class:`nestrec.devices.Lane`): a worker thread each
(gloo collectives and sleeps release the GIL) plus, on an accelerator, a stream each, ordered
against the main stream by events. Each lane owns one process group (``router``: keys,
``comm``: rows and gradients), so concurrent collectives never interleave within a group. The
micro-batch loop on the main thread never synchronises with the device: route indices and the
dual-buffer copy's positions are prepared on lanes, the loss is summed on the device and read
once per batch, when ``StepResult.loss`` is first read. ``PipelineConfig.check_host_sync``
turns that promise into an error (:meth:`nestrec.devices.DeviceAPI.host_sync_guard`).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from nestrec.devices import Lane, LaneHandle
from nestrec.errors import ConfigError
from nestrec.pipeline.clustering import CLUSTERING_METHODS, cluster_samples, sample_keys
from nestrec.pipeline.staged import StagedHandle, StagedLane, timed_stages
from nestrec.pipeline.timeline import Timeline
from nestrec.sharding.collection import ShardedEmbeddingCollection
from nestrec.sharding.comm import PendingMean, start_all_reduce_mean
from nestrec.sharding.dataplane import (
    BatchRoute,
    ReconcilePlan,
    RowBuffer,
    apply_update,
    plan_reconcile,
    pool_rows,
    reconcile,
    retrieve,
    return_grads,
    route_stages,
    run_stages,
    send_rows,
    write_back,
)
from nestrec.sparse.jagged import JaggedFeatures

__all__ = ["PIPELINE_MODES", "ROUTERS", "PipelineConfig", "PipelinedModel", "NestPipeEngine", "StepResult"]

PIPELINE_MODES = ("sync", "dbp", "fwp", "nested")
ROUTERS = ("auto", "thread", "inline")


@dataclass
class PipelineConfig:
    """How steps are scheduled. ``micro_batches`` applies to ``fwp`` and ``nested``."""

    mode: str = "sync"
    micro_batches: int = 8
    clustering: str = "none"
    retrieval_depth: int = 2
    seed: int = 0
    # Debug switches for negative controls only: turning either off breaks exactness on purpose.
    dual_buffer_copy: bool = True
    writeback_ordering: bool = True
    # Raise HostSyncError if the micro-batch loop blocks the host on the device (tests, gpu_check).
    check_host_sync: bool = False
    # Where prefetching schedules route keys ahead: ``thread`` (a router lane, for hosts with cores
    # to spare: GPU boxes), ``inline`` (asynchronous collectives advanced between the main thread's
    # stages: CPU training, where every core already computes), ``auto`` (inline on CPU).
    router: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in PIPELINE_MODES:
            raise ConfigError(
                f"unknown NestPipe pipeline {self.mode!r}; available: {', '.join(PIPELINE_MODES)}"
            )
        if int(self.micro_batches) < 1:
            raise ConfigError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.clustering not in CLUSTERING_METHODS:
            raise ConfigError(
                f"unknown clustering {self.clustering!r}; expected one of {', '.join(CLUSTERING_METHODS)}"
            )
        if self.router not in ROUTERS:
            raise ConfigError(f"unknown router {self.router!r}; expected one of {', '.join(ROUTERS)}")
        if self.retrieval_depth != 2:
            raise ConfigError(
                f"retrieval_depth={self.retrieval_depth} is not supported: exactness with one dual-buffer copy "
                "needs depth 2 (rows retrieved one batch ahead); deeper prefetch needs a cascading copy"
            )

    @property
    def prefetch(self) -> bool:
        return self.mode in ("dbp", "nested")

    @property
    def num_micro_batches(self) -> int:
        return int(self.micro_batches) if self.mode in ("fwp", "nested") else 1


@runtime_checkable
class PipelinedModel(Protocol):
    """What a model provides so its step can be pipelined: the embedding boundary made explicit.

    ``loss_sum`` must be a *sum* of per-sample losses with no coupling between samples (no
    batch norm, no in-batch negatives), so micro-batches add up to the batch (brief §6). The
    engine divides it by the local batch size, or by ``loss_normalizer(batch)`` when the model
    defines one (e.g. the number of target tokens of a sequence model).
    """

    def sparse_features(self, batch: Any) -> JaggedFeatures: ...

    def select_samples(self, batch: Any, index: torch.Tensor) -> Any: ...

    def loss_sum(self, batch: Any, pooled: dict[str, torch.Tensor]) -> torch.Tensor: ...


def _normalizer(model: PipelinedModel, batch: Any, size: int) -> int:
    """The local batch loss is ``loss_sum / normalizer``: samples unless the model counts tokens."""
    count = getattr(model, "loss_normalizer", None)
    return max(1, int(count(batch))) if count is not None else max(1, size)


@dataclass
class StepResult:
    loss_tensor: torch.Tensor  # mean loss of the local batch, on the compute device
    batch_size: int
    step: int
    step_ms: float
    exposed_comm_ms: float
    exposed_lookup_ms: float
    dual_buffer_rows: int = 0
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        """The loss as a Python float (reading it waits for the device)."""
        return float(self.loss_tensor)


@dataclass
class _Prepared:
    step: int
    batch: Any
    size: int
    micro: list[Any]
    micro_sizes: list[int]
    routes: BatchRoute
    normalizer: int = 1


def _same_group(a, b) -> bool:
    """Whether two process-group arguments name the same group (``None`` is the world)."""
    if dist.is_available() and dist.is_initialized():
        a = dist.group.WORLD if a is None else a
        b = dist.group.WORLD if b is None else b
    return a is b


class _Ready:
    """A handle that is already complete (same ``wait()`` as a lane's)."""

    def __init__(self, value: Any):
        self.value = value

    def wait(self) -> Any:
        return self.value


class NestPipeEngine:
    """Runs training steps for ``model`` whose tables are ``collection``.

    Args:
        model: implements :class:`PipelinedModel`.
        collection: the model's sharded tables (already sharded for this rank).
        dense_parameters: parameters outside the tables; their gradients are averaged over
            ranks once per batch (the engine replaces DDP's reducer).
        dense_step: applies the dense optimizer (and clears its gradients).
        config: the schedule.
        dense_group: process group of the dense all-reduce (default: the world).
    """

    def __init__(
        self,
        model: PipelinedModel,
        collection: ShardedEmbeddingCollection,
        dense_parameters: list[torch.nn.Parameter],
        dense_step: Callable[[], None],
        config: PipelineConfig | None = None,
        dense_group=None,
        timeline: Timeline | None = None,
    ):
        self.model = model
        self.collection = collection
        self.dense_parameters = [p for p in dense_parameters if p.requires_grad]
        self.dense_step = dense_step
        self.config = config or PipelineConfig()
        self.dense_group = dense_group
        self.timeline = timeline or Timeline()
        overlapped = self.config.prefetch or self.config.num_micro_batches > 1
        if overlapped and collection.world_size > 1 and collection.key_group is collection.embedding_group:
            raise ConfigError(
                f"pipeline={self.config.mode} runs key routing and row All2All on separate lanes: the "
                "collection needs two distinct process groups (key_group, embedding_group), got one"
            )
        self.device = collection.compute_device
        self.device_api = collection.device_api
        router = self.config.router
        self._inline_routing = router == "inline" or (router == "auto" and self.device.type == "cpu")
        self._feature_table = {f: t.name for t in collection.tables for f in t.features}
        self._lanes: dict[str, Lane | StagedLane] = {}
        self._step = 0
        self._iterator: Iterator | None = None
        self._exhausted = True
        self._routing: deque[LaneHandle] = deque()
        self._current: tuple[_Prepared, Any] | None = None
        self._writeback: LaneHandle | None = None
        self._deferred: RowBuffer | None = None

    # -- lanes --------------------------------------------------------------------------------------
    def _submit(self, lane: str, name: str, step: int, fn: Callable[[], Any]) -> LaneHandle:
        if lane not in self._lanes:
            self._lanes[lane] = self.device_api.new_lane(f"nestpipe-{lane}")

        def run():
            with self.timeline.span(name, lane, step):
                return fn()

        return self._lanes[lane].submit(run)

    def _submit_staged(self, lane: str, name: str, step: int, stages) -> StagedHandle:
        """Queue staged work on an inline lane (see :mod:`nestrec.pipeline.staged`)."""
        if lane not in self._lanes:
            self._lanes[lane] = StagedLane(f"nestpipe-{lane}")
        return self._lanes[lane].submit(timed_stages(stages, lambda: self.timeline.span(name, lane, step)))

    def _advance_routing(self) -> None:
        """A point of the schedule where inline key routing takes its next stage."""
        lane = self._lanes.get("router")
        if isinstance(lane, StagedLane):
            lane.advance()

    def _wait(self, name: str, step: int, handle) -> Any:
        with self.timeline.span(f"wait:{name}", "main", step):
            return handle.wait()

    def close(self) -> None:
        """Finish pending work and stop the lanes (even when pending work failed)."""
        try:
            self.flush()
        finally:
            for lane in self._lanes.values():
                lane.shutdown()
            self._lanes.clear()

    # -- public -------------------------------------------------------------------------------------
    def step(self, iterator: Iterator) -> list[StepResult]:
        """Train on the next batch of ``iterator``: a list of one result, or ``[]`` when none is left.

        Prefetching schedules read up to two batches ahead; once the iterator runs dry they keep
        returning the batches already in flight, one per call, so an epoch never loses its tail
        (``in_flight`` says whether any remain).
        """
        self.collection.train()
        if not self.config.prefetch:
            try:
                batch = next(iterator)
            except StopIteration:
                return []
            return [self._run_inline(batch)]
        if iterator is not self._iterator:
            self.reset()
            self._iterator, self._exhausted = iterator, False
        return self._run_prefetched()

    @property
    def in_flight(self) -> bool:
        """Batches read from the iterator but not trained yet (prefetching schedules only)."""
        return self._current is not None or bool(self._routing)

    @property
    def exhausted(self) -> bool:
        return self._exhausted

    def flush(self) -> None:
        """Make the host shards current (pending write-backs land) and let key routing already in
        flight finish, so a lookup made next (validation) never shares the key group with it.
        Prefetched rows and routed batches stay valid."""
        for handle in self._routing:
            handle.wait()
        if self._writeback is not None:
            self._writeback.wait()
            self._writeback = None
        if self._deferred is not None:
            write_back(self.collection, self._deferred)
            self._deferred = None

    def reset(self) -> None:
        """Drop read-ahead state (new epoch, restored checkpoint). Nothing trained is lost."""
        for handle in self._routing:
            handle.wait()  # collectives already issued must complete on every rank
        self._routing.clear()
        self._current = None
        self.flush()
        self._iterator, self._exhausted = None, True

    # -- stage 1 + 3 --------------------------------------------------------------------------------
    def _prepare(self, step: int, batch: Any) -> _Prepared:
        return run_stages(self._prepare_stages(step, batch))

    def _prepare_stages(self, step: int, batch: Any) -> Generator[None, None, _Prepared]:
        features = self.model.sparse_features(batch)
        size = features.batch_size
        parts = self.config.num_micro_batches
        if parts == 1:
            micro, micro_features, sizes = [batch], [features], [size]
        else:
            method = self.config.clustering
            keys = sample_keys(features, self._feature_table) if method != "none" else [[]] * size
            index = cluster_samples(keys, parts, method, seed=self.config.seed).micro_batches()
            micro = [self.model.select_samples(batch, i) for i in index]
            micro_features = [features.select_samples(i) for i in index]
            sizes = [len(i) for i in index]
        routes = yield from route_stages(self.collection, micro_features, self.collection.key_group)
        return _Prepared(step, batch, size, micro, sizes, routes, _normalizer(self.model, batch, size))

    # -- schedules ----------------------------------------------------------------------------------
    def _run_inline(self, batch: Any) -> StepResult:
        step, start = self._next_step(), time.perf_counter()
        with self.timeline.span("route", "main", step):
            prepared = self._prepare(step, batch)
        with self.timeline.span("retrieve", "main", step):
            # No other batch's rows are in flight: the shard stores are the working rows.
            buffer = retrieve(self.collection, prepared.routes, direct=True)
        loss = self._stage5(prepared, buffer)
        with self.timeline.span("write_back", "main", step):
            write_back(self.collection, buffer)
        return self._result(step, start, loss, prepared.size)

    def _fill(self) -> None:
        """Keep key routing two batches ahead of compute (stage 1 + 3 on the router thread)."""
        while not self._exhausted and len(self._routing) + (self._current is not None) < 3:
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._exhausted = True
                break
            step = self._step + len(self._routing) + (self._current is not None)
            if self._inline_routing:
                handle = self._submit_staged("router", "route", step, self._prepare_stages(step, batch))
            else:
                handle = self._submit("router", "route", step, lambda s=step, b=batch: self._prepare(s, b))
            self._routing.append(handle)

    def _retrieval(self, prepared: _Prepared, after: _Prepared | None = None) -> LaneHandle:
        """Stage 4 on the retrieval lane; with ``after`` (the batch computing now) also the
        positions of the dual-buffer copy, so the copy itself never waits on the host."""

        def run() -> tuple[RowBuffer, ReconcilePlan | None]:
            # Shards on the compute device (CPU training, storage=device) need no dual buffer: the
            # rows are read when they are sent, after the previous batch's update; only key
            # routing runs ahead. Host shards on an accelerator get a device copy, reconciled.
            buffer = retrieve(self.collection, prepared.routes, direct=True)
            if buffer.direct or after is None:
                return buffer, None
            return buffer, plan_reconcile(self.collection, after.routes, prepared.routes)

        return self._submit("retrieval", "retrieve", prepared.step, run)

    def _run_prefetched(self) -> list[StepResult]:
        results = []
        while True:
            self._fill()
            if self._current is None:
                if not self._routing:
                    break
                first = self._wait("route", self._step, self._routing.popleft())
                self._current = (first, self._retrieval(first))
            prepared, handle = self._current
            step, start = self._next_step(), time.perf_counter()
            upcoming = None
            if self._routing:
                nxt = self._wait("route", step, self._routing.popleft())
                # Queued after write-back(t-1) on the same lane: reads see every earlier update.
                upcoming = (nxt, self._retrieval(nxt, after=prepared))
                self._fill()
            if self._deferred is not None:  # negative control: write-back lands after the read
                if upcoming is not None:
                    upcoming[1].wait()
                write_back(self.collection, self._deferred)
                self._deferred = None
            active, _ = self._wait("retrieve", step, handle)
            self._advance_routing()
            loss = self._stage5(prepared, active)
            copied = 0
            if upcoming is not None:
                prefetch, plan = self._wait("retrieve", step, upcoming[1])
                if self.config.dual_buffer_copy and plan is not None:
                    with self.timeline.span("dual_buffer_copy", "main", step):
                        copied = reconcile(active, prefetch, plan)
                upcoming = (upcoming[0], _Ready((prefetch, None)))
            if self.config.writeback_ordering:
                if self._writeback is not None:
                    self._writeback.wait()
                self._writeback = self._submit(
                    "retrieval", "write_back", step, lambda b=active: write_back(self.collection, b)
                )
            else:
                self._deferred = active
            self._current = upcoming
            results.append(self._result(step, start, loss, prepared.size, copied))
            break
        if self._current is None and self._exhausted:
            self.flush()
        return results

    # -- stage 5 ------------------------------------------------------------------------------------
    def _stage5(self, prepared: _Prepared, buffer: RowBuffer) -> torch.Tensor:
        """FWP over the prepared micro-batches: forward All2All ahead, gradient All2All behind."""
        step, micro, routes = prepared.step, prepared.micro, prepared.routes
        overlap = len(micro) > 1
        group = self.collection.embedding_group
        self._zero_dense_grads()

        def fetch(i: int):
            return lambda: send_rows(self.collection, buffer, routes, i, group)

        def give_back(i: int, grads: dict[str, torch.Tensor]):
            return lambda: return_grads(self.collection, buffer, routes, i, grads, group)

        forward: dict[int, LaneHandle] = {}
        backward: list[LaneHandle] = []
        if overlap:
            forward[0] = self._submit("comm", "a2a_fwd", step, fetch(0))
        # Summed on the device; read on the host only when someone reads StepResult.loss.
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        check = self.config.check_host_sync
        # Once the last micro-batch's backward is done the dense gradients are final: their
        # all-reduce starts then and travels while the gradient All2All and the sparse update run —
        # unless it shares a process group with the comm lane's gradient All2All, whose order
        # against it would then differ between ranks (it starts after that lane drains).
        shared_group = _same_group(self.dense_group, group)
        dense: PendingMean | None = None
        with self.device_api.host_sync_guard() if check else contextlib.nullcontext():
            for i, batch in enumerate(micro):
                if overlap:
                    if i + 1 < len(micro):
                        forward[i + 1] = self._submit("comm", "a2a_fwd", step, fetch(i + 1))
                    rows = self._wait("a2a_fwd", step, forward.pop(i))
                else:
                    with self.timeline.span("a2a_fwd", "main", step):
                        rows = fetch(i)()
                with self.timeline.span("compute", "main", step):
                    leaves = {name: r.detach().requires_grad_(True) for name, r in rows.items()}
                    if prepared.micro_sizes[i]:  # an empty micro-batch still joins the collectives
                        pooled = pool_rows(self.collection, routes, i, leaves)
                        loss = self.model.loss_sum(batch, pooled) / prepared.normalizer
                        loss.backward()
                        total += loss.detach()
                    grads = {
                        n: leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                        for n, leaf in leaves.items()
                    }
                if i == len(micro) - 1 and not (overlap and shared_group):
                    dense = self._start_dense_all_reduce(step)
                if overlap:
                    backward.append(self._submit("comm", "a2a_bwd", step, give_back(i, grads)))
                else:
                    with self.timeline.span("a2a_bwd", "main", step):
                        give_back(i, grads)()
        self._advance_routing()  # outside the micro-batch loop: routing does host work
        for handle in backward:
            self._wait("a2a_bwd", step, handle)
        if dense is None:
            dense = self._start_dense_all_reduce(step)
        with self.timeline.span("sparse_update", "main", step):
            apply_update(self.collection, buffer)
        with self.timeline.span("wait:allreduce", "main", step):
            dense.wait()
        with self.timeline.span("dense_step", "main", step):
            self.dense_step()
        return total

    # -- dense ----------------------------------------------------------------------------------------
    def _zero_dense_grads(self) -> None:
        for p in self.dense_parameters:
            p.grad = None

    def _start_dense_all_reduce(self, step: int) -> PendingMean:
        for p in self.dense_parameters:
            if p.grad is None:  # every rank must contribute every tensor to the all-reduce
                p.grad = torch.zeros_like(p)
        with self.timeline.span("allreduce", "main", step):
            return start_all_reduce_mean([p.grad for p in self.dense_parameters], self.dense_group)

    # -- bookkeeping ------------------------------------------------------------------------------------
    def _next_step(self) -> int:
        step = self._step
        self._step += 1
        return step

    def _result(self, step: int, start: float, loss: torch.Tensor, size: int, copied: int = 0) -> StepResult:
        comm, lookup = self.timeline.exposed_ms(step)
        return StepResult(
            loss_tensor=loss,
            batch_size=size,
            step=step,
            step_ms=(time.perf_counter() - start) * 1e3,
            exposed_comm_ms=comm,
            exposed_lookup_ms=lookup,
            dual_buffer_rows=copied,
            stages=self.timeline.stage_ms(step),
        )
