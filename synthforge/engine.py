"""Executors: where a stage's functions run.

A stage is written once, as functions over record batches (see `Stage`):

    summarize(rows) -> pa.Table        per batch: the facts its global step needs (hashes, scores, group keys)
    reduce(engine, summaries, total) -> pa.Table | None
                                       the global step, as keyed reduces the engine runs; one decision row per
                                       input sample, in input order
    apply(rows, decisions) -> (kept, rejected)
                                       per batch, given the decisions of its rows
    tally(kept, rejected)              on the driver, as output arrives: counts for stats.json

`LocalEngine` runs them in this process, one batch at a time: memory holds one batch of rows plus the compact
summaries and decisions. `RayEngine` runs the per-batch functions as Ray Data tasks (an actor pool, with GPUs per
actor, for stages that hold a model) and each keyed reduce as a shuffle into partitions of whole keys. Both cut
the input into the same batches and every reduce function sees whole keys, so both engines give the same output.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import pickle
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa

from synthforge import errors
from synthforge.errors import BadInput, SynthforgeError
from synthforge.stagedir import (
    DEFAULT_BATCH_ROWS,
    Batch,
    Row,
    StageInput,
    StageWriter,
    plan_batches,
    rejected_schema,
    stage_fingerprint,
)

if TYPE_CHECKING:
    import ray.data

ENGINES = ("local", "ray")
ORDINAL = "ordinal"  # every summary row's place in the input: reduces sort by it, decisions are indexed by it
_PARTITION = "__partition"
_TASK = "__task"
_RESULT = "__result"

log = logging.getLogger(__name__)


class Stage(Protocol):
    name: str
    needs_reduce: bool
    uses_model: bool  # holds a model: the Ray engine runs it in an actor pool, loading the model once per actor

    def summarize(self, rows: list[Row]) -> pa.Table: ...

    def reduce(self, engine: Engine, summaries: Frame, total: int) -> pa.Table | None: ...

    def apply(self, rows: list[Row], decisions: pa.Table | None) -> tuple[list[Row], list[Row]]: ...

    def tally(self, kept: list[Row], rejected: list[Row]) -> None: ...

    def metrics(self) -> dict[str, Any]: ...


class StageBase:
    """Defaults for a stage that maps batch by batch, with no global step and no model."""

    needs_reduce = False
    uses_model = False

    def __init__(self, name: str):
        self.name = name
        self._metrics: dict[str, Any] = {}
        self._rebuild: tuple[Callable[..., Stage], tuple] | None = None

    def rebuilt_by(self, factory: Callable[..., Stage], *args: Any) -> StageBase:
        """Send this stage to other processes as `factory(*args)`, run in this working directory, rather than
        pickled: a stage holding a model (or a client with a lock) is built afresh, once per Ray actor."""
        self._rebuild = (factory, args)
        return self

    def __reduce_ex__(self, protocol):
        if self._rebuild is None:
            return super().__reduce_ex__(protocol)
        return _build_in, (os.getcwd(), *self._rebuild)

    def summarize(self, rows: list[Row]) -> pa.Table:
        raise NotImplementedError(f"{self.name} has no global step")

    def reduce(self, engine: Engine, summaries: Frame, total: int) -> pa.Table | None:
        return None

    def tally(self, kept: list[Row], rejected: list[Row]) -> None:
        pass

    def metrics(self) -> dict[str, Any]:
        return self._metrics


def _build_in(cwd: str, factory: Callable[..., Stage], args: tuple) -> Stage:
    os.chdir(cwd)  # a stage's paths (models, protected sets) are relative to the project, as on the driver
    return factory(*args)


Output = tuple[list[Row], list[Row]]  # (kept, rejected)
Frame = Any  # a table of summaries: a pa.Table on the local engine, a ray.data.Dataset on Ray


def with_ordinals(summary: pa.Table, batch: Batch) -> pa.Table:
    if summary.num_rows != batch.stop - batch.start:
        raise ValueError(f"summarize returned {summary.num_rows} rows for a batch of {batch.stop - batch.start}")
    return summary.append_column(ORDINAL, pa.array(np.arange(batch.first, batch.first + summary.num_rows), pa.int64()))


def align(decided: pa.Table, total: int) -> pa.Table:
    """Decisions (with an ORDINAL column) laid out one row per input sample; null where none was made."""
    index = np.full(total, -1, dtype=np.int64)
    index[decided.column(ORDINAL).to_numpy()] = np.arange(decided.num_rows)
    return decided.drop_columns([ORDINAL]).take(pa.array(index, mask=index < 0))


def struct_column(table: pa.Table) -> pa.StructArray:
    """A table as one struct column (to carry several checks' summaries or decisions side by side)."""
    return pa.StructArray.from_arrays([c.combine_chunks() for c in table.columns], table.column_names)


def decisions_for(decisions: pa.Table | None, batch: Batch) -> pa.Table | None:
    return None if decisions is None else decisions.slice(batch.first, batch.stop - batch.start)


def output_table(kept: list[Row], rejected: list[Row], schema: pa.Schema) -> pa.Table:
    """Kept and rejected rows as one Arrow table (kept first), so they travel between processes as Arrow."""
    out = rejected_schema(schema).append(pa.field("__kept", pa.bool_()))
    rows = [{**r, "__kept": True} for r in kept] + [{**r, "__kept": False} for r in rejected]
    return pa.Table.from_pylist(rows, schema=out)


def split_output(table: pa.Table) -> tuple[list[Row], list[Row]]:
    kept_mask = table.column("__kept").to_pylist()
    rows = table.drop_columns(["__kept"]).to_pylist()
    kept = [{k: v for k, v in r.items() if k not in ("rejected_by", "reason")} for r, k in zip(rows, kept_mask, strict=True) if k]
    return kept, [r for r, k in zip(rows, kept_mask, strict=True) if not k]


def key_partitions(column: pa.ChunkedArray | pa.Array, partitions: int) -> np.ndarray:
    """A stable partition number per value: every row of one key lands in the same partition, on any process."""
    values = column.to_pylist()
    return np.fromiter(
        (zlib.crc32(v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogatepass")) % partitions for v in values),
        dtype=np.int64,
        count=len(values),
    )


class Engine:
    """What a stage's reduce step uses: keyed reduces and maps over frames of summaries."""

    name: str

    def summarize(self, stage: Stage, batches: list[Batch], desc: str) -> Frame:
        raise NotImplementedError

    def apply(self, stage: Stage, batches: list[Batch], decisions: pa.Table | None, schema: pa.Schema) -> Iterator[Output]:
        """(kept, rejected) of every batch, in input order."""
        raise NotImplementedError

    def reduce_by_key(self, frame: Frame, key: str, fn: Callable[[pa.Table], pa.Table]) -> Frame:
        """fn over partitions of the frame that each hold every row of their keys (in no particular order)."""
        raise NotImplementedError

    def map(self, frame: Frame, fn: Callable[[pa.Table], pa.Table]) -> Frame:
        """fn over pieces of the frame, row by row independent."""
        raise NotImplementedError

    def collect(self, frame: Frame, schema: pa.Schema | None = None) -> pa.Table:
        """The frame as one table on the driver; `schema` is what an empty result looks like."""
        raise NotImplementedError

    def run_tasks(self, worker: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        """worker(task) for every task, in task order, each as it finishes. On Ray the worker is pickled to an actor
        pool (engine.ray.actors actors, gpus_per_actor GPUs each): one that loads a model should do so on its first
        call, and leave the model out of what it pickles, so each actor loads it once. Results are pickled back."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalEngine(Engine):
    """This process, one batch at a time."""

    name = "local"

    def summarize(self, stage: Stage, batches: list[Batch], desc: str) -> pa.Table:
        from synthforge.progress import progress_bar

        parts = []
        with progress_bar(desc, sum(b.stop - b.start for b in batches)) as advance:
            for batch in batches:
                parts.append(with_ordinals(stage.summarize(batch.rows()), batch))
                advance(batch.stop - batch.start)
        return pa.concat_tables(parts) if parts else None

    def apply(self, stage: Stage, batches: list[Batch], decisions: pa.Table | None, schema: pa.Schema) -> Iterator[Output]:
        for batch in batches:
            yield stage.apply(batch.rows(), decisions_for(decisions, batch))

    def reduce_by_key(self, frame: pa.Table, key: str, fn: Callable[[pa.Table], pa.Table]) -> pa.Table:
        return fn(frame)

    def map(self, frame: pa.Table, fn: Callable[[pa.Table], pa.Table]) -> pa.Table:
        return fn(frame)

    def collect(self, frame: pa.Table, schema: pa.Schema | None = None) -> pa.Table:
        return frame

    def run_tasks(self, worker: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        for task in tasks:  # lazily: a stage may plan its tasks as it goes
            yield worker(task)


@dataclass
class RayOptions:
    address: str | None = None  # a running cluster; None starts a local instance on 127.0.0.1
    num_cpus: int | None = None
    actors: int = 1  # actors in the pool of a stage that holds a model
    gpus_per_actor: float = 0.0
    partitions: int | None = None  # of each keyed reduce; None: 2 per CPU


# Ray Data re-raises a worker's exception as a RayTaskError that keeps only its traceback text, so a worker's
# SynthforgeError (a damaged shard: exit code 2, one line naming the place) travels as one marked, JSON-encoded line
# of that text and is raised again on the driver.
_CARRIED = "synthforge-error: "


def _carrying_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SynthforgeError as exc:
            raise RuntimeError(_CARRIED + json.dumps([type(exc).__name__, str(exc), exc.exit_code])) from None

    return run


@contextlib.contextmanager
def _surfacing_errors() -> Iterator[None]:
    """Raise a worker's SynthforgeError again, as itself (its class where synthforge.errors has it, its exit code
    always), in the driver."""
    try:
        yield
    except Exception as exc:
        import ray.exceptions

        if not isinstance(exc, ray.exceptions.RayError):
            raise
        text = str(exc)
        found = re.search(re.escape(_CARRIED), text)
        if found is None:
            raise
        try:
            (kind, message, exit_code), _ = json.JSONDecoder().raw_decode(text, found.end())
        except ValueError:
            raise exc from None
        cls = getattr(errors, kind, None)
        error = (cls if isinstance(cls, type) and issubclass(cls, SynthforgeError) else SynthforgeError)(message)
        error.exit_code = exit_code
        raise error from None


class _Actor:
    """A Ray Data actor's state, made on its first batch (not in __init__) so that a SynthforgeError raised while
    building it (a model path missing on a worker) reaches the driver as itself."""

    def __init__(self, *refs):
        self.refs, self.state = refs, None

    @_carrying_errors
    def __call__(self, specs: pa.Table) -> pa.Table:
        import ray

        if self.state is None:
            self.state = self.build(*(ray.get(r) if isinstance(r, ray.ObjectRef) else r for r in self.refs))
        return self.run(specs)


class _Summarizer(_Actor):
    """Summarises batches with its own copy of the stage."""

    def build(self, stage: Stage):
        return stage

    def run(self, specs: pa.Table) -> pa.Table:
        return pa.concat_tables([with_ordinals(self.state.summarize(b.rows()), b) for b in _batches_of(specs)])


class _Applier(_Actor):
    """Applies the stage to batches, given their slices of the decisions."""

    def build(self, stage: Stage, decisions: pa.Table | None, schema: pa.Schema):
        return stage, decisions, schema

    def run(self, specs: pa.Table) -> pa.Table:
        stage, decisions, schema = self.state
        tables = []
        for b in _batches_of(specs):
            kept, rejected = stage.apply(b.rows(), decisions_for(decisions, b))
            tables.append(output_table(kept, rejected, schema))
        return pa.concat_tables(tables)


class _TaskRunner(_Actor):
    """Runs tasks with its copy of the worker, each task fetched when it runs; results go back pickled."""

    def build(self, worker: Callable[[Any], Any], task_refs: list):
        return worker, task_refs

    def run(self, specs: pa.Table) -> pa.Table:
        import ray

        worker, task_refs = self.state
        indices = specs.column(_TASK).to_pylist()
        results = [pickle.dumps(worker(ray.get(task_refs[i])), protocol=pickle.HIGHEST_PROTOCOL) for i in indices]
        return pa.table({_TASK: pa.array(indices, pa.int64()), _RESULT: pa.array(results, pa.large_binary())})


def _batches_of(specs: pa.Table) -> list[Batch]:
    return [Batch(**row) for row in specs.to_pylist()]


class RayEngine(Engine):
    """Ray Data: per-batch work in actor pools, keyed reduces as a shuffle into partitions."""

    name = "ray"

    def __init__(self, options: RayOptions | None = None):
        self.options = options or RayOptions()
        if not self.options.address:
            # A local instance serves this process only: keep it on loopback. Ray resolves 127.0.0.1 to the
            # machine's routable address unless clusters are off, which this (read at import) turns off.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            import ray
        except ImportError:
            raise BadInput("engine ray: Ray is not installed; install the extra: pip install 'synthforge[ray]'") from None
        self._started = False
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            if self.options.address:
                ray.init(address=self.options.address, log_to_driver=False)
            else:
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                ray.init(
                    num_cpus=self.options.num_cpus,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    log_to_driver=False,
                    configure_logging=False,
                )
            self._started = True
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.partitions = self.options.partitions or 2 * self.cpus

    def close(self) -> None:
        import ray

        global _ENGINE
        if _ENGINE is self:
            _ENGINE = None
        if self._started and ray.is_initialized():
            ray.shutdown()

    def _specs(self, batches: list[Batch]) -> ray.data.Dataset:
        import ray

        return ray.data.from_items([b.__dict__ for b in batches], override_num_blocks=max(1, len(batches)))

    def summarize(self, stage: Stage, batches: list[Batch], desc: str) -> ray.data.Dataset | None:
        import ray

        if not batches:
            return None
        log.info("%s on Ray: %d batches", desc, len(batches))
        ref = ray.put(stage)
        with _surfacing_errors():
            return (
                self._specs(batches)
                .map_batches(
                    _Summarizer, fn_constructor_args=(ref,), batch_size=1, batch_format="pyarrow", **self._actor_pool(stage)
                )
                .materialize()
            )

    def _actor_pool(self, stage: Stage) -> dict[str, Any]:
        """Callable classes always run in an actor pool; a stage without a model gets one actor per CPU."""
        import ray

        if getattr(stage, "uses_model", False):
            return self._model_pool()
        return {"compute": ray.data.ActorPoolStrategy(min_size=1, max_size=self.cpus)}

    def _model_pool(self) -> dict[str, Any]:
        """engine.ray.actors actors, each loading the model once, with engine.ray.gpus_per_actor GPUs."""
        import ray

        return {
            "compute": ray.data.ActorPoolStrategy(size=self.options.actors),
            **({"num_gpus": self.options.gpus_per_actor} if self.options.gpus_per_actor else {}),
        }

    def apply(self, stage: Stage, batches: list[Batch], decisions: pa.Table | None, schema: pa.Schema) -> Iterator[Output]:
        import ray

        if not batches:
            return
        stage_ref = ray.put(stage)
        decisions_ref = ray.put(decisions) if decisions is not None else None
        ds = self._specs(batches).map_batches(
            _Applier,
            fn_constructor_args=(stage_ref, decisions_ref, schema),
            batch_size=1,
            batch_format="pyarrow",
            **self._actor_pool(stage),
        )
        with _surfacing_errors():
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                yield split_output(table)

    def reduce_by_key(self, frame: ray.data.Dataset, key: str, fn: Callable[[pa.Table], pa.Table]) -> ray.data.Dataset:
        partitions = self.partitions

        def tag(t: pa.Table) -> pa.Table:
            return t.append_column(_PARTITION, pa.array(key_partitions(t.column(key), partitions)))

        @_carrying_errors
        def reduce(t: pa.Table) -> pa.Table:
            return fn(t.drop_columns([_PARTITION]))

        with _surfacing_errors():
            return (
                frame.map_batches(tag, batch_format="pyarrow", batch_size=None)
                .groupby(_PARTITION)
                .map_groups(reduce, batch_format="pyarrow")
                .materialize()
            )

    def map(self, frame: ray.data.Dataset, fn: Callable[[pa.Table], pa.Table]) -> ray.data.Dataset:
        with _surfacing_errors():
            return frame.map_batches(_carrying_errors(fn), batch_format="pyarrow", batch_size=None).materialize()

    def run_tasks(self, worker: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        import ray

        tasks = list(tasks)
        if not tasks:
            return
        items = ray.data.from_items([{_TASK: i} for i in range(len(tasks))], override_num_blocks=len(tasks))
        done = items.map_batches(
            _TaskRunner,
            # One object per task: an actor fetches the tasks it runs, not the whole plan.
            fn_constructor_args=(ray.put(worker), [ray.put(t) for t in tasks]),
            batch_size=1,
            batch_format="pyarrow",
            **self._model_pool(),
        )
        expected = 0
        with _surfacing_errors():
            for table in done.iter_batches(batch_size=None, batch_format="pyarrow"):
                for index, result in zip(table.column(_TASK).to_pylist(), table.column(_RESULT).to_pylist(), strict=True):
                    if index != expected:  # preserve_order keeps them in order; a result is never misfiled
                        raise RuntimeError(f"Ray returned task {index} where task {expected} was due")
                    expected += 1
                    yield pickle.loads(result)

    def collect(self, frame: ray.data.Dataset, schema: pa.Schema | None = None) -> pa.Table:
        tables = list(frame.iter_batches(batch_size=None, batch_format="pyarrow"))
        if tables:
            return pa.concat_tables(tables)
        found = frame.schema()  # a reduce over no keys has no rows, and Ray may not know their schema
        return (schema or (found.base_schema if found is not None else pa.schema([]))).empty_table()


def engine_options(params: dict[str, Any] | None, override: str | None = None) -> tuple[str, int, RayOptions]:
    section = (params or {}).get("engine") or {}
    name = override or section.get("name", "local")
    if name not in ENGINES:
        raise BadInput(f"--engine: unknown engine {name!r} (known: {', '.join(ENGINES)})")
    return name, int(section.get("batch_rows", DEFAULT_BATCH_ROWS)), RayOptions(**(section.get("ray") or {}))


_ENGINE: Engine | None = None


def get_engine(params: dict[str, Any] | None = None, override: str | None = None) -> tuple[Engine, int]:
    """The engine params (or --engine) ask for, and the batch size; a Ray engine is started once per process."""
    global _ENGINE
    name, batch_rows, ray_options = engine_options(params, override)
    if name == "local":
        return LocalEngine(), batch_rows
    if not isinstance(_ENGINE, RayEngine):
        _ENGINE = RayEngine(ray_options)
    return _ENGINE, batch_rows


def engine_args(params: dict[str, Any]) -> dict[str, Any]:
    """run_stage's engine and batch_rows as params (`engine` section) ask for them."""
    engine, batch_rows = get_engine(params)
    return {"engine": engine, "batch_rows": batch_rows}


def run_stage(
    stage: Stage,
    source: StageInput,
    out: str | Path,
    params: Any,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    extra_inputs: dict[str, str] | None = None,
    engine: Engine | None = None,
) -> dict:
    """Run a stage over an input stage directory and write its own; returns its stats.

    extra_inputs: fingerprints of what else the stage reads (a classifier, the real images), by name. The engine
    is not part of the fingerprint: both give the same output.
    """
    from synthforge.progress import progress_bar

    engine = engine or LocalEngine()
    fingerprint = stage_fingerprint(stage.name, params, {source.stage: source.fingerprint, **(extra_inputs or {})})
    batches = plan_batches(source, batch_rows)
    total = sum(b.stop - b.start for b in batches)
    decisions = None
    if stage.needs_reduce:
        summaries = engine.summarize(stage, batches, f"{stage.name}: scan")
        decisions = stage.reduce(engine, summaries, total)
        if decisions is not None and decisions.num_rows != total:
            raise ValueError(f"{stage.name}: reduce gave {decisions.num_rows} decisions for {total} samples")
    with StageWriter(out, stage.name, source.schema, fingerprint) as writer:
        with progress_bar(stage.name, total) as advance:
            for kept, rejected in engine.apply(stage, batches, decisions, writer.schema):
                stage.tally(kept, rejected)
                writer.write(kept, rejected)
                advance(len(kept) + len(rejected))
        writer.metrics = stage.metrics()
    return writer.stats
