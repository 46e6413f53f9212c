"""The generation engine: one CCoE model, one KV cache, one step loop on its own thread.

    engine = Engine(CCoEModel.from_pretrained(path), EngineConfig(max_running=32))
    with engine:
        result = engine.complete_sync(GenerationRequest(prompt="Compute 12 + 7", expert="math"))
        async for delta in engine.generate(request): ...        # from asyncio code

Every step the loop (1) drops cancelled and expired requests, (2) asks the scheduler for a
plan, (3) runs one forward for all decoding rows and one for the prompt chunks — rows of
different experts share each forward — (4) samples, (5) commits: advances each sequence past
the tokens it now has in the KV cache, detokenises and streams deltas.

A request that fails inside a step fails alone (invariant 7). A forward that raises is run
once more, without the rows whose expert is no longer resident and split by expert, so an
expert whose modules fail takes only its own rows down; a sampling error (logits that are
not finite, say) sends the step's rows through the sampler one at a time, each generator
rewound first, so only the rows that raise again fail. Nothing about a sequence changes
before step (5), so a step run again writes the same KV positions again and draws the same
numbers. Every other row gets exactly the token it would get without the failing one.

Experts change without stopping the loop. `push` reads and validates the artifact on the
caller's thread, then adds the new version atomically; requests name their expert version at
submission ("math" resolves to the newest version then) and keep it to the end. `pop` marks
versions as draining: new requests for them are refused, accepted ones finish, and the
weights are freed when the last one ends. That bookkeeping is `ExpertResidency`
(engine/residency.py); the engine acquires a version per request and releases it at the end.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ccoe_common.engine.detokenizer import IncrementalDetokenizer
from ccoe_common.engine.errors import Cancelled, DeadlineExceeded, EngineError, EngineStopped
from ccoe_common.engine.malloc import retain_freed_memory
from ccoe_common.engine.openmp import release_openmp_workers
from ccoe_common.engine.params import GenerationRequest, GenerationResult, Timings, TokenDelta, Usage
from ccoe_common.engine.residency import ExpertResidency
from ccoe_common.engine.sampler import RowSampling, make_generator, sample
from ccoe_common.engine.scheduler import PrefillChunk, Scheduler, Sequence, StepPlan
from ccoe_common.engine.templates import TemplateError, render_alpaca, render_chat
from ccoe_common.errors import InvalidRequest
from ccoe_common.experts.artifact import ExpertArtifact
from ccoe_common.experts.reference import ExpertKey
from ccoe_common.model.ccoe import CCoEModel
from ccoe_common.model.expert import LoadedExpert
from ccoe_common.model.kv_cache import KVCache
from ccoe_common.model.static.decode import StaticDecoder

log = logging.getLogger(__name__)

Sink = Callable[[TokenDelta | EngineError], None]


class EngineConfig(BaseModel):
    """Limits of one engine (one replica). Example: EngineConfig(max_seq_len=4096, max_running=64)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_seq_len: int = Field(2048, ge=8, le=1 << 20, description="Prompt + output tokens per sequence (one KV slot).")
    max_running: int = Field(32, ge=1, le=4096, description="Sequences decoding at once (KV slots).")
    kv_token_budget: int | None = Field(
        None, ge=8, description="KV positions to preallocate; caps the slots at budget // max_seq_len.")
    max_batched_tokens: int = Field(512, ge=1, description="Tokens per step (decode + prompt chunks).")
    prefill_chunk: int = Field(256, ge=1, description="Most prompt tokens one sequence adds in a step.")
    max_waiting: int = Field(256, ge=1, description="Requests queued for a slot; beyond it, RESOURCE_EXHAUSTED.")
    retry_after_s: float = Field(1.0, gt=0, description="Retry advice sent with RESOURCE_EXHAUSTED.")
    compile: bool = Field(
        False, description="Run the decoder layers through torch.compile (fused kernels; the first prefill and "
                           "decode steps compile once). Greedy tokens equal eager ones in fp32 (tested); in "
                           "bf16/fp16 fused kernels round differently, so low-margin tokens may differ.")
    static_decode: bool = Field(
        False, description="Run decode steps on the static path (model/static/decode.py): batch sizes padded to "
                           "buckets, attention over whole KV slots under a device-built mask, the MLPs of rows on "
                           "different ffn experts as one grouped GEMM per projection; on a CUDA device each "
                           "bucket's step is captured once as a CUDA graph and replayed. The GPU serving path; "
                           "on the CPU it runs eagerly and is slower than the default one-row and bucketed paths. "
                           "Greedy tokens equal the eager path's (tested); prefill stays eager.")
    retain_freed_memory: bool = Field(
        True, description="Tune glibc's malloc (process-wide, at start) to keep freed activation memory for the "
                          "next step instead of mapping it anew every step (engine/malloc.py: a CPU prefill "
                          "step 955 -> 674 ms); the process then holds its peak of transient activations.")

    @property
    def num_slots(self) -> int:
        if self.kv_token_budget is None:
            return self.max_running
        return min(self.max_running, self.kv_token_budget // self.max_seq_len)

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.num_slots < 1:
            raise ValueError(f"kv_token_budget={self.kv_token_budget} holds no sequence of "
                             f"max_seq_len={self.max_seq_len}")
        if self.max_batched_tokens < self.num_slots:
            raise ValueError(f"max_batched_tokens={self.max_batched_tokens} must be >= the {self.num_slots} KV slots")
        if self.compile and self.static_decode:
            raise ValueError("compile and static_decode are two ways of running the decode step; choose one")
        return self


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    free_slots: int
    steps: int
    generated_tokens: int
    resident: dict[str, int]  # "math@1" -> bytes
    draining: list[str]
    staged: list[str]  # resident, not yet admitted: only allow_staged requests run on them
    kv_cache_bytes: int
    step_retries: int = 0  # steps whose forward or sampling failed and ran again, split up
    failed_in_step: int = 0  # requests that failed alone inside a step (the others carried on)


@dataclass(eq=False)
class _RequestState:
    request: GenerationRequest
    sink: Sink
    sampling: RowSampling
    detok: IncrementalDetokenizer
    submitted: float
    cancelled: bool = False
    logprobs: list[float] = field(default_factory=list)


class Engine:
    def __init__(self, model: CCoEModel, config: EngineConfig | None = None):
        self.model = model
        self.config = config or EngineConfig()
        if model.tokenizer is None:
            raise ValueError(f"backbone {model.info.path} has no tokenizer; the engine needs one to encode prompts")
        self.tokenizer = model.tokenizer
        device, dtype = model.backbone.device, model.backbone.dtype
        # The static decode path's padding rows write to one extra slot that no request owns.
        extra = 1 if self.config.static_decode else 0
        self.cache = KVCache(model.config, self.config.num_slots + extra, self.config.max_seq_len, dtype, device)
        if self.config.compile:
            model.backbone.compile_layers()
        self.static: StaticDecoder | None = None
        if self.config.static_decode:
            self.static = StaticDecoder(model, self.cache, self.config.num_slots)
        self.scheduler = Scheduler(self.config.num_slots, self.config.max_batched_tokens,
                                   self.config.prefill_chunk, self.config.max_waiting, self.config.retry_after_s)
        eos = set(model.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self.residency = ExpertResidency(model)  # which versions requests may pin; frees drained ones
        # Guards the scheduler's queues and _by_id. Taken before the residency's own lock,
        # never while holding it.
        self._lock = threading.Lock()
        self._by_id: dict[str, Sequence] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._steps = 0
        self._generated = 0
        self._step_retries = 0
        self._failed_in_step = 0

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> Engine:
        # The caller most likely loaded the model: its OpenMP workers would slow every step
        # (see engine/openmp.py), and it has no more parallel work for them.
        release_openmp_workers()
        if self.config.retain_freed_memory:
            retain_freed_memory()
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="ccoe-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            leftovers = self.scheduler.all_sequences()
        for seq in leftovers:
            self._fail(seq, EngineStopped(f"request {seq.request_id} was not finished: the engine stopped"))

    @property
    def alive(self) -> bool:
        """True while the step loop runs."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- requests ------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        """Queue a request; deltas and a final error (if any) go to `sink` from the engine thread.

        Raises at once (nothing queued) for invalid requests, unknown or draining experts,
        and a full queue (Overloaded, retryable).
        """
        if self._thread is None or self._stopping:
            raise EngineStopped("the engine is not running")
        request.check()
        prompt_ids = self._encode(request)
        limit = self.config.max_seq_len
        if len(prompt_ids) >= limit:
            raise InvalidRequest("prompt", f"has {len(prompt_ids)} tokens; this engine's max_seq_len is {limit}, "
                                           "which must also leave room for at least one new token")
        params = request.sampling
        now = time.monotonic()
        device = self.model.backbone.device
        state = _RequestState(
            request=request, sink=sink, submitted=now,
            sampling=RowSampling(params, make_generator(params, device),
                                 None if params.repetition_penalty == 1.0 else torch.tensor(prompt_ids)),
            detok=IncrementalDetokenizer(self.tokenizer, params.stop),
        )
        seq = Sequence(
            request_id=request.request_id, prompt_ids=prompt_ids, expert=None,
            max_new_tokens=min(params.max_new_tokens, limit - len(prompt_ids)),
            deadline=None if request.timeout_s is None else now + request.timeout_s, state=state,
        )
        with self._lock:
            if request.request_id in self._by_id:
                raise InvalidRequest("request_id", f"{request.request_id!r} is already in flight")
            # Resolved once, here: every step of this request runs on this version.
            seq.expert = self.residency.acquire(request.expert, allow_staged=request.allow_staged)
            try:
                self.scheduler.add(seq)  # may raise Overloaded
            except Exception:
                self.residency.release(seq.expert)
                raise
            self._by_id[seq.request_id] = seq
        self._wake.set()

    def cancel(self, request_id: str) -> bool:
        """Stop a request at the next step boundary and free its slot. False if unknown."""
        with self._lock:
            seq = self._by_id.get(request_id)
            if seq is None:
                return False
            seq.state.cancelled = True
        self._wake.set()
        return True

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """Stream deltas. Leaving the iteration early (or the task being cancelled) cancels
        the request in the engine, which frees its slot at the next step."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenDelta | EngineError] = asyncio.Queue()

        def sink(event: TokenDelta | EngineError) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the caller's event loop is gone: nobody is listening
                self.cancel(request.request_id)

        self.submit(request, sink)
        done = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, EngineError):
                    done = True
                    raise event
                if event.finish_reason is not None:
                    done = True
                yield event
                if done:
                    return
        finally:
            if not done:
                self.cancel(request.request_id)

    async def complete(self, request: GenerationRequest) -> GenerationResult:
        deltas = [d async for d in self.generate(request)]
        return _collect(request.request_id, deltas)

    def complete_sync(self, request: GenerationRequest, timeout: float | None = None) -> GenerationResult:
        """Blocking form for scripts and the CLI."""
        events: queue.SimpleQueue[TokenDelta | EngineError] = queue.SimpleQueue()
        self.submit(request, events.put)
        deltas: list[TokenDelta] = []
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                event = events.get(timeout=None if end is None else max(0.0, end - time.monotonic()))
            except queue.Empty:
                self.cancel(request.request_id)
                raise DeadlineExceeded(f"request {request.request_id} took longer than {timeout}s") from None
            if isinstance(event, EngineError):
                raise event
            deltas.append(event)
            if event.finish_reason is not None:
                return _collect(request.request_id, deltas)

    # ---- experts -------------------------------------------------------------------------

    def load(self, source: ExpertArtifact | str) -> LoadedExpert:
        """Read and check an artifact on the calling thread, without serving it (`push` it next).

        Use this rather than `model.load` from other threads: the load's copies leave
        OpenMP workers on the calling thread, which slow every later step (engine/openmp.py),
        so they are released here.
        """
        try:
            return self.model.load(source)
        finally:
            release_openmp_workers()

    def push(self, source: LoadedExpert | ExpertArtifact | str, *, staged: bool = False) -> ExpertKey:
        """Add an expert version while serving. Reading and validating the artifact happen on
        the calling thread; the step loop only ever sees the finished expert appear.

        staged: resident but not yet serving: only requests with allow_staged run on it (a smoke
        test), name-only requests keep resolving to older versions, until `admit(key)`."""
        expert = source if isinstance(source, LoadedExpert) else self.load(source)
        return self.residency.push(expert, staged=staged)

    def admit(self, key: ExpertKey) -> None:
        """Let every request run on a staged version (it passed its smoke test)."""
        self.residency.admit(key)

    def pop(self, name: str, version: int | None = None, *, export_to: str | None = None,
            wait: float | None = None) -> list[ExpertKey]:
        """Retire one version (or all versions) of `name`: refuse new requests for it, let
        accepted ones finish, free it after the last. `wait` blocks up to that many seconds
        until freed. With export_to, a deep copy of the newest retired version is written first."""
        keys = self.residency.retirable(name, version)
        if export_to is not None:
            # Before draining: the expert stays resident (and serving) while it is written,
            # and writing an artifact holds no lock the step loop needs.
            self.model.export(keys[-1], export_to)
        keys = self.residency.drain(keys)
        if wait is not None and not self.residency.wait_for_unload(keys, wait):
            raise TimeoutError(f"expert {name!r} still has requests in flight after {wait}s")
        return keys

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                free_slots=len(self.scheduler.free_slots), steps=self._steps, generated_tokens=self._generated,
                resident=self.model.memory_report().experts,
                draining=sorted(map(str, self.residency.draining())),
                staged=sorted(map(str, self.residency.staged())),
                kv_cache_bytes=self.cache.nbytes, step_retries=self._step_retries,
                failed_in_step=self._failed_in_step,
            )

    def _encode(self, request: GenerationRequest) -> list[int]:
        if request.prompt_ids is not None:
            ids = list(request.prompt_ids)
            vocab = self.model.config.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise InvalidRequest("prompt_ids", f"token ids must be in [0, {vocab}), got {bad[:5]}")
        else:
            try:
                if request.template == "chat":
                    text, special = render_chat(self.tokenizer, request.messages or []), False
                elif request.template == "alpaca":
                    text, special = render_alpaca(request.prompt or ""), True
                else:
                    text, special = request.prompt or "", True
            except TemplateError as e:
                raise InvalidRequest("messages", str(e)) from e
            ids = self.tokenizer(text, add_special_tokens=special).input_ids
        if not ids:
            raise InvalidRequest("prompt", "is empty after tokenisation; send some text")
        return ids

    # ---- the step loop -------------------------------------------------------------------

    def _loop(self) -> None:
        busy = False
        while not self._stopping:
            now = time.monotonic()
            with self._lock:
                doomed = self._reap(now)
                for seq, _ in doomed:
                    # Out of the scheduler before it plans: a cancelled row left in this step's
                    # plan has no slot any more, and would fail every other row of the step.
                    self._retire(seq)
                plan = self.scheduler.schedule(now)
            for seq, error in doomed:
                self._send(seq, error)
            if plan.empty:
                if busy:
                    # An idle engine holds no OpenMP workers, so other threads' kernels (a
                    # push's load, another engine) do not run oversubscribed meanwhile.
                    release_openmp_workers()
                    busy = False
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            busy = True
            try:
                self._step(plan)
                # Let the threads that stream results and take new requests run between steps;
                # without this they wait out the interpreter's switch interval, step after step.
                time.sleep(0)
            except Exception as e:  # a bug outside the forward and the sampler: fail what is left, keep serving
                log.exception("engine step failed")
                for seq in [*plan.decode, *(c.seq for c in plan.prefill)]:
                    self._fail(seq, EngineError(f"internal error while generating: {type(e).__name__}: {e}"),
                               scrub=True)

    def _reap(self, now: float) -> list[tuple[Sequence, EngineError]]:
        doomed: list[tuple[Sequence, EngineError]] = []
        for seq in self.scheduler.all_sequences():
            if seq.state.cancelled:
                doomed.append((seq, Cancelled(f"request {seq.request_id} was cancelled")))
            elif seq.deadline is not None and now >= seq.deadline:
                doomed.append((seq, DeadlineExceeded(
                    f"request {seq.request_id} exceeded its {seq.state.request.timeout_s}s deadline "
                    f"after {len(seq.output_ids)} tokens")))
        return doomed

    @torch.inference_mode()
    def _step(self, plan: StepPlan) -> None:
        failed: dict[Sequence, EngineError] = {}  # rows that end in this step, alone
        try:
            rows, logits = self._forward(plan.decode, plan.prefill)
        except Exception as e:
            log.warning("step %d: the forward failed (%s: %s); running it again by expert", self._steps,
                        type(e).__name__, e, exc_info=True)
            self._step_retries += 1
            rows, logits = self._forward_again(plan, failed)
        tokens, logprobs = self._sample(rows, logits, failed)
        self._steps += 1
        # Commit. Only now does a sequence count this step's tokens as in its KV slot: a
        # forward that ran again wrote the same positions again, never past them.
        for seq in plan.decode:
            if seq not in failed:
                seq.computed += 1
        for c in plan.prefill:
            if c.seq not in failed:
                c.seq.computed += c.length
        now = time.monotonic()
        for seq, token, lp in zip(rows, tokens, logprobs, strict=True):
            if seq in failed:
                continue
            try:
                self._advance(seq, token, lp, now)
            except Exception as e:  # its detokenizer or its sink: this request's own
                log.exception("request %s failed after its token was chosen", seq.request_id)
                failed[seq] = EngineError(f"internal error while streaming: {type(e).__name__}: {e}")
        for seq, error in failed.items():
            if self._fail(seq, error, scrub=True):
                self._failed_in_step += 1

    def _forward(self, decode: list[Sequence],
                 prefill: list[PrefillChunk]) -> tuple[list[Sequence], torch.Tensor | None]:
        """Run the step's forwards -> (rows that sample, in order; their logits [R, V]).

        Changes no sequence: running it again for the same rows writes the same KV positions."""
        device = self.model.backbone.device
        rows: list[Sequence] = []
        logits = []
        experts = [s.expert for s in decode]
        if decode and self.static is not None and self.static.accepts(experts):
            rows.extend(decode)
            logits.append(self.static.decode([s.output_ids[-1] for s in decode], [s.computed for s in decode],
                                             [_slot(s) for s in decode], experts))
        elif decode:
            ids = torch.tensor([[s.output_ids[-1]] for s in decode], device=device)
            positions = torch.tensor([[s.computed] for s in decode], device=device)
            out = self.model.forward(ids, experts, positions=positions, cache=self.cache,
                                     slots=torch.tensor([s.slot for s in decode], device=device),
                                     logits_at=torch.zeros(len(decode), dtype=torch.long, device=device))
            rows.extend(decode)
            logits.append(out)
        if prefill:
            out, finishing = self._prefill(prefill)
            if finishing:
                rows.extend(c.seq for c in finishing)
                logits.append(out)
        if not logits:
            return rows, None
        # cat copies even a single tensor: [64, 151936] bf16 logits are 19 MB a step.
        return rows, logits[0] if len(logits) == 1 else torch.cat(logits)

    def _forward_again(self, plan: StepPlan,
                       failed: dict[Sequence, EngineError]) -> tuple[list[Sequence], torch.Tensor | None]:
        """The step's forward failed: run it once more without the rows it can blame.

        Rows whose expert is no longer resident fail at once. The rest run again, one forward
        per expert, so an expert whose modules raise fails only its own rows; a fault of no
        particular expert (a device error) fails every row only if it happens again.
        """
        resident = set(self.model.resident())
        for seq in [*plan.decode, *(c.seq for c in plan.prefill)]:
            if seq.expert is not None and seq.expert not in resident:
                failed[seq] = EngineError(f"expert {seq.expert} of request {seq.request_id} is no longer resident "
                                          "here; its weights went away while the request ran")
        by_expert: dict[ExpertKey | None, tuple[list[Sequence], list[PrefillChunk]]] = {}
        for seq in plan.decode:
            if seq not in failed:
                by_expert.setdefault(seq.expert, ([], []))[0].append(seq)
        for c in plan.prefill:
            if c.seq not in failed:
                by_expert.setdefault(c.seq.expert, ([], []))[1].append(c)
        rows: list[Sequence] = []
        logits = []
        for expert, (decode, prefill) in by_expert.items():
            try:
                got, out = self._forward(decode, prefill)
            except Exception as e:
                on = "the backbone" if expert is None else f"expert {expert}"
                log.exception("step %d: the forward of the rows on %s failed again; failing those %d requests",
                              self._steps, on, len(decode) + len(prefill))
                for seq in [*decode, *(c.seq for c in prefill)]:
                    failed[seq] = EngineError(f"internal error while generating on {on}: {type(e).__name__}: {e}")
                continue
            rows.extend(got)
            if out is not None:
                logits.append(out)
        return rows, (torch.cat(logits) if logits else None)

    def _sample(self, rows: list[Sequence], logits: torch.Tensor | None,
                failed: dict[Sequence, EngineError]) -> tuple[list[int], list[float | None]]:
        """Tokens for the rows that sample. If the batch raises, every row is sampled again
        alone from its generator's state before the batch (a row draws the same alone as in
        any batch), and only the rows that raise again fail."""
        if not rows:
            return [], []
        assert logits is not None  # rows that sample always come with their logits
        params = [s.state.sampling for s in rows]
        rewind = [(r.generator, r.generator.get_state()) for r in params if r.generator is not None]
        try:
            return sample(logits, params)
        except Exception as e:  # noqa: BLE001 - found again, row by row, below
            log.warning("step %d: sampling failed (%s: %s); sampling its %d rows one at a time", self._steps,
                        type(e).__name__, e, len(rows))
        self._step_retries += 1
        for generator, state in rewind:
            generator.set_state(state)
        tokens: list[int] = [0] * len(rows)
        logprobs: list[float | None] = [None] * len(rows)
        for i, (seq, r) in enumerate(zip(rows, params, strict=True)):
            try:
                (tokens[i],), (logprobs[i],) = sample(logits[i:i + 1], [r])
            except Exception as e:  # noqa: BLE001 - this row's error, reported to its request
                on = "" if seq.expert is None else f" on expert {seq.expert}"
                failed[seq] = EngineError(f"request {seq.request_id}{on} could not choose token "
                                          f"{len(seq.output_ids) + 1}: {type(e).__name__}: {e}")
        return tokens, logprobs

    def _prefill(self, chunks: list[PrefillChunk]) -> tuple[torch.Tensor, list[PrefillChunk]]:
        device = self.model.backbone.device
        width = max(c.length for c in chunks)
        ids = torch.zeros((len(chunks), width), dtype=torch.long, device=device)
        for i, c in enumerate(chunks):
            ids[i, : c.length] = torch.tensor(c.seq.prompt_ids[c.start:c.start + c.length])
        starts = torch.tensor([c.start for c in chunks], device=device)
        positions = starts[:, None] + torch.arange(width, device=device)[None]
        lens = torch.tensor([c.length for c in chunks], device=device)
        out = self.model.forward(ids, [c.seq.expert for c in chunks], query_lens=lens, positions=positions,
                                 cache=self.cache, slots=torch.tensor([c.seq.slot for c in chunks], device=device),
                                 logits_at=lens - 1)
        keep = [i for i, c in enumerate(chunks) if c.completes_prompt]
        return out[keep], [chunks[i] for i in keep]

    def _advance(self, seq: Sequence, token: int, logprob: float | None, now: float) -> None:
        st = seq.state
        params = st.request.sampling
        seq.output_ids.append(token)
        self._generated += 1
        if seq.first_token is None:
            seq.first_token = now
        if st.sampling.seen is not None:
            st.sampling.seen = torch.cat([st.sampling.seen, torch.tensor([token])])
        if logprob is not None:
            st.logprobs.append(logprob)
        text = st.detok.add(token)
        finish = None
        if st.detok.stopped:
            finish = "stop"
        elif (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            finish = "stop"
        elif len(seq.output_ids) >= seq.max_new_tokens:
            finish = "length"
        if finish is not None:
            text += st.detok.finish()
            with self._lock:
                self._retire(seq)
        delta = TokenDelta(
            request_id=seq.request_id, token_ids=[token], text=text,
            logprobs=None if logprob is None else [logprob], finish_reason=finish, expert=seq.expert,
            usage=Usage(len(seq.prompt_ids), len(seq.output_ids)) if finish else None,
            timings=self._timings(seq, now) if finish else None,
        )
        st.sink(delta)  # may raise: the step fails this request alone

    def _timings(self, seq: Sequence, now: float) -> Timings:
        start = seq.state.submitted
        return Timings(
            queue_s=(seq.first_scheduled or now) - start,
            ttft_s=None if seq.first_token is None else seq.first_token - start,
            total_s=now - start,
        )

    def _retire(self, seq: Sequence) -> bool:
        """End a request's stay in the engine; False if it had already ended. Caller holds self._lock."""
        if self._by_id.pop(seq.request_id, None) is None:
            return False
        self.scheduler.finish(seq)
        self.residency.release(seq.expert)
        return True

    def _fail(self, seq: Sequence, error: EngineError, *, scrub: bool = False) -> bool:
        """End a request with `error`; False if it had already ended. scrub: it failed inside a
        step, so its KV slot may hold NaN, which the slot's next request would read (a masked
        position weighs 0, and 0 x NaN is NaN); the slot is zeroed before anyone can take it."""
        slot = seq.slot
        with self._lock:
            ended = self._retire(seq)
        if ended and scrub and slot is not None:
            # Safe here: slots are handed out only by the step loop, which is this thread
            # (or stop(), after the loop ended).
            self.cache.k[:, slot].zero_()
            self.cache.v[:, slot].zero_()
        if ended:  # a request that already ended (finished in this step, say) gets no second end
            self._send(seq, error)
        return ended

    def _send(self, seq: Sequence, error: EngineError) -> None:
        """Tell a request it ended; a sink that raises cannot take the loop down with it."""
        try:
            seq.state.sink(error)
        except Exception:
            log.exception("the sink of request %s raised while it was told %s", seq.request_id, type(error).__name__)


def _slot(seq: Sequence) -> int:
    assert seq.slot is not None, "a decoding sequence holds a slot"
    return seq.slot


def _collect(request_id: str, deltas: list[TokenDelta]) -> GenerationResult:
    last = deltas[-1]
    assert last.finish_reason is not None and last.usage is not None and last.timings is not None
    lps = [lp for d in deltas for lp in (d.logprobs or [])]
    return GenerationResult(
        request_id=request_id,
        token_ids=[t for d in deltas for t in d.token_ids],
        text="".join(d.text for d in deltas),
        finish_reason=last.finish_reason,
        expert=last.expert,
        usage=last.usage,
        timings=last.timings,
        logprobs=lps or None,
    )
