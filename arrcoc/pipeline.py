"""The pipeline: images (and a query) -> relevance maps -> budgeted, packed tokens.

``Pipeline`` is the one object users hold: preprocess + an encoder per bucket + the relevance head
(:class:`arrcoc.stages.head.RelevanceHead`). A call goes through three parts that each know one thing: the host
front end (:mod:`arrcoc.frontend`: inputs, budgets, queries, the output), the chain of one bucket
(:meth:`Pipeline.stages`: tensors in, tensors out, static shapes), and the graph runner
(:class:`arrcoc.runtime.graphs.GraphCache`: keys, capture, replay), which runs the chain as one CUDA graph.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DEFAULT_WEIGHTS_DIR, PipelineConfig
from .errors import BudgetError, InvalidInputError, InvalidTypeError, MissingWeightsError
from .frontend import (
    BUDGET_POLICIES,
    CAPACITY_STEP,
    RESULT_KEYS,
    UNTIMED,
    StageTimer,
    asks_every_image,
    budget_tensor,
    build_output,
    check_budgets,
    prepare_query,
    scatter_into,
    token_capacity,
)
from .outputs import CompressionOutput, ScoreOutput
from .runtime.background_capture import BackgroundCapture
from .runtime.graphs import CaptureError, GraphCache, GraphKey
from .runtime.streams import run_branches
from .stages.encoders import ENCODER_DTYPES, Encoder, create_backbone, encoder_for_bucket, patch_stride
from .stages.head import RelevanceHead, Stage, needs_objectness
from .stages.objectness import OBJECTNESS_FILE, Objectness, encoder_fingerprint
from .stages.preprocess import PreprocessedBatch, Preprocessor
from .stages.regions import region_grid
from .stages.text_query import TEXT_QUERY_FILE, TextQueryEncoder

__all__ = ["Pipeline", "DEFAULT_WEIGHTS_DIR", "BATCH_BUCKETS", "BUDGET_POLICIES", "token_capacity", "graph_inputs"]

logger = logging.getLogger(__name__)


#: With CUDA graphs, a batch pads up to the nearest of these (beyond the last: the next multiple of it).
BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


def _batch_bucket(batch: int) -> int:
    last = BATCH_BUCKETS[-1]
    return next((b for b in BATCH_BUCKETS if b >= batch), -(-batch // last) * last)


def _query_bucket(tokens: int) -> int:
    return 1 << max(0, tokens - 1).bit_length()  # 1, 2, 4, 8, ...


def _allow_recompiles(count: int) -> None:
    """Let dynamo compile each function for ``count`` shapes: every graph key (bucket, batch bucket, capacity) is its
    own static compile, and past dynamo's default of 8 the later keys would run uncompiled, with only a warning."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(config, name, max(getattr(config, name), count))


class Pipeline(nn.Module):
    """Relevance-driven visual token compression.

    Example:
        >>> pipe = arrcoc.Pipeline.from_pretrained()
        >>> out = pipe(["street.jpg", pil_image], budget=256)
        >>> out.tokens.shape, out.mask.sum(1)   # (2, 256, D), tensor([256, 256])

    Args:
        config: the pipeline's configuration (``PipelineConfig.from_name("default")`` when omitted).
        weights: a local safetensors file with the encoder's weights; without one the encoder is a
            deterministic random initialisation (the texture-based scorers still work).
        device: where to run; the default is CPU (move later with ``.to``).
        cuda_graphs: on CUDA, run the stages as captured CUDA graphs (default: on, unless the environment
            sets ``ARRCOC_CUDA_GRAPHS=0``). On CPU the stages always run eagerly, with identical results.
        compile: ``torch.compile`` each stage (each branch, where a stage runs branches side by side) before
            capture: fusion inside the graphs. ``"head"``: only arrcoc's own stages (the texture, the relevance
            head), the backbone as it is, so that its features, and so the allocations, are the plain chain's up to
            float32 rounding in the head (``True`` compiles the backbone too, whose bfloat16 arithmetic then moves).
        compile_in_background: with ``compile`` and graphs, never wait for the compiler: each graph key is served by
            its plain graph at once while a helper thread compiles and captures its compiled chain, which serves the
            key's calls from then on (:meth:`wait_for_compile` waits for it). A key whose compile fails stays plain,
            with a warning. No capture runs beside a compile: a key first met while one runs is served eagerly
            until it ends. ``"deferred"``: the same, but no compile starts before :meth:`start_compile` (a job
            that learns only once it runs whether it will run long enough to repay a compile).
        concurrent: on CUDA, run independent work side by side on side streams (parallel branches of the
            graph): the backbone beside the texture features and allocation bounds, the three scorers and
            the balance's region similarity beside each other. The results are the same either way.
        graph_cache: the cache of captured chains (a new one, bounded to 32 entries, by default).
        graph_batch: graphed calls pad their batch to at least this many images (default: each batch to its own
            bucket of ``BATCH_BUCKETS``), so that a job whose batches hold at most this many uses one graph per bucket
            size; with ``compile``, one compile per bucket size instead of one per size of its last batches.
        objectness: for ``balance.pick="peaks"``: the objectness probe, or the path of its safetensors file (default:
            ``objectness.safetensors`` beside ``weights``). It must have been trained on this encoder's weights.

    Raises:
        MissingWeightsError: ``balance.pick="peaks"`` without a probe trained on this encoder (an untrained encoder,
            another width, other weights, or no probe file).
    """

    def __init__(
        self,
        config: PipelineConfig | None = None,
        *,
        weights: str | os.PathLike[str] | None = None,
        device: torch.device | str | None = None,
        cuda_graphs: bool | None = None,
        compile: bool | Literal["head"] = False,
        compile_in_background: bool | Literal["deferred"] = False,
        concurrent: bool = True,
        graph_cache: GraphCache | None = None,
        graph_batch: int | None = None,
        objectness: Objectness | str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if graph_batch is not None and (isinstance(graph_batch, bool) or not isinstance(graph_batch, int)):
            raise InvalidTypeError(f"graph_batch must be an int or None; got {type(graph_batch).__name__}")
        if graph_batch is not None and graph_batch < 1:
            raise InvalidInputError(f"graph_batch must be at least 1; got {graph_batch}")
        if compile not in (False, True, "head"):
            raise InvalidInputError(f'compile must be False, True or "head"; got {compile!r}')
        if compile_in_background not in (False, True, "deferred"):
            raise InvalidInputError(
                f'compile_in_background must be False, True or "deferred"; got {compile_in_background!r}'
            )
        if compile_in_background and not compile:
            raise InvalidInputError('compile_in_background needs compile=True or compile="head"')
        if config is not None and not isinstance(config, PipelineConfig):
            raise InvalidTypeError(
                f"config must be a PipelineConfig (PipelineConfig.from_dict reads a dict); got {type(config).__name__}"
            )
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as err:
                raise InvalidInputError(
                    f'device must be a torch device such as "cpu" or "cuda"; got {device!r}'
                ) from err
        self.config = config = config or PipelineConfig()
        self.weights_path = None if weights is None else os.fspath(weights)
        self.preprocessor = Preprocessor(config.buckets, multiple=1)
        self.backbone = create_backbone(config.encoder, weights=weights, seed=config.seed, **config.encoder_kwargs)
        stride = patch_stride(self.backbone)
        bad = [b for b in config.buckets if b % stride]
        if bad:
            raise InvalidInputError(f"buckets {bad} are not multiples of the encoder's patch stride {stride}")
        self.cuda_graphs = cuda_graphs if cuda_graphs is not None else os.environ.get("ARRCOC_CUDA_GRAPHS", "1") != "0"
        self.compile = compile
        if compile:
            _allow_recompiles(64)
        self.concurrent = concurrent
        self.encoders = nn.ModuleDict()  # one per bucket, built on first use; they share the backbone's tensors
        probe = self._objectness(objectness) if needs_objectness(config) else None
        self.head = RelevanceHead(config, concurrent=concurrent, compile=bool(compile), objectness=probe)
        self.text_encoder: nn.Module | None = None
        self.graph_cache = graph_cache if graph_cache is not None else GraphCache()  # an empty cache is falsy
        # the compiled chains, built beside the plain ones that serve until then
        self.compiled_chains = (
            BackgroundCapture(
                lambda key: self._build(key, compile),
                self.graph_cache.max_entries,
                self.graph_cache.backend,
                # the bucket's encoder and the width are built in the caller's thread, not beside it in the helper's
                prepare=lambda key: (self.encoder(key.bucket), self.width),
                started=compile_in_background is True,
            )
            if compile_in_background
            else None
        )
        self.graph_batch = graph_batch
        self._eager_only: dict[GraphKey, str] = {}  # keys whose capture failed, with the reason
        if device is not None:
            self.to(device)

    def _objectness(self, given: Objectness | str | os.PathLike[str] | None) -> Objectness:
        """The probe of ``pick="peaks"``, checked against this pipeline's encoder (width and weights)."""
        # fingerprinted before the width is read: reading it builds a bucket's encoder, which may cast the weights
        trained = None if self.weights_path is None else encoder_fingerprint(self.backbone.state_dict())
        if isinstance(given, Objectness):
            probe = given
        elif given is not None:
            probe = Objectness.load(given)
        elif self.weights_path is not None:
            probe = Objectness.load(Path(self.weights_path).parent / OBJECTNESS_FILE)
        else:  # an untrained encoder: no probe can know its features
            probe = None
        what = f"this pipeline's encoder ({self.config.encoder})"
        if probe is None:
            raise MissingWeightsError(
                f"balance.pick='peaks' needs an objectness probe trained on {what}'s features, and it has no "
                "trained weights (a random initialisation): load one with Pipeline.from_pretrained() or choose "
                "another pick"
            )
        probe.check(self.width, trained, what)
        return probe

    # --- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        device: torch.device | str | None = None,
        cuda_graphs: bool | None = None,
        compile: bool | Literal["head"] = False,
        compile_in_background: bool | Literal["deferred"] = False,
        concurrent: bool = True,
        graph_cache: GraphCache | None = None,
        graph_batch: int | None = None,
        **overrides: Any,
    ) -> Pipeline:
        """Load a pipeline from a folder with ``config.json`` and ``encoder.safetensors``; offline.

        A ``text_query.safetensors`` beside them (the trained query encoder) is loaded as ``text_encoder``, so
        string queries work.

        Args:
            path: a local folder (default: the weights shipped with arrcoc, ``arrcoc.config.DEFAULT_WEIGHTS_DIR``).
            device, cuda_graphs, compile, compile_in_background, concurrent, graph_cache, graph_batch: as for
                :class:`Pipeline`.
            **overrides: config fields to change (e.g. ``buckets=(224, 384)``).

        Raises:
            MissingWeightsError: the folder lacks ``config.json`` or ``encoder.safetensors`` (for the default, an
                installation without the shipped weights: ``Pipeline()`` builds the untrained model on purpose).
        """
        folder = Path(path) if path is not None else DEFAULT_WEIGHTS_DIR
        config_file, weights_file = folder / "config.json", folder / "encoder.safetensors"
        where = "the shipped weights folder" if path is None else "path"
        untrained = (
            "(Pipeline() builds an untrained pipeline on purpose: a random encoder, weight-free "
            "propositional and perspectival scorers, no text queries.)"
        )
        if not config_file.is_file():
            raise MissingWeightsError(
                f"{where} {os.fspath(folder)!r} holds no config.json; expected a folder saved by "
                f"Pipeline.save_pretrained {untrained}"
            )
        try:
            config = PipelineConfig.from_json(config_file.read_text())
        except InvalidInputError as err:
            raise type(err)(f"{os.fspath(config_file)!r}: {err}") from err
        if not weights_file.is_file():
            raise MissingWeightsError(
                f"{where} {os.fspath(folder)!r} holds no encoder.safetensors, so the encoder "
                f"would be untrained {untrained}"
            )
        pipe = cls(
            config.replace(**overrides),
            weights=weights_file,
            device=device,
            cuda_graphs=cuda_graphs,
            compile=compile,
            compile_in_background=compile_in_background,
            concurrent=concurrent,
            graph_cache=graph_cache,
            graph_batch=graph_batch,
        )
        if (folder / TEXT_QUERY_FILE).is_file():  # the trained query encoder: text queries become embeddings
            pipe.text_encoder = TextQueryEncoder.from_pretrained(folder, device=pipe.device)
        elif path is None:
            warnings.warn(
                f"the shipped weights folder {os.fspath(folder)!r} lacks {TEXT_QUERY_FILE}: text queries "
                "will raise MissingWeightsError (query embeddings still work)",
                stacklevel=2,
            )
        return pipe

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Write ``config.json``, ``encoder.safetensors`` (and the text query encoder, when one is loaded) to a
        folder, loadable by :meth:`from_pretrained`."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(self.config.to_json())
        state = {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}  # ok-sync: saving
        save_file(state, folder / "encoder.safetensors")
        if isinstance(self.text_encoder, TextQueryEncoder):
            self.text_encoder.save_pretrained(folder)
        if self.head.objectness is not None:  # pick="peaks" loads it back beside the encoder it belongs to
            self.head.objectness.save(folder / OBJECTNESS_FILE)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def _apply(self, fn: Any, recurse: bool = True) -> Pipeline:
        self.graph_cache.clear()  # captured graphs hold the old device's (or dtype's) tensors
        if self.compiled_chains is not None:
            self.compiled_chains.clear()
        self._eager_only.clear()
        return super()._apply(fn, recurse)

    def encoder(self, bucket: int) -> Encoder:
        """The encode stage for one bucket size (built on first use, weights shared with the backbone)."""
        name = str(bucket)
        if name not in self.encoders:
            cfg = self.config
            stage = encoder_for_bucket(self.backbone, cfg.encoder, bucket, cfg.encoder_kwargs, cfg.encoder_dtype)
            if cfg.encoder_dtype != "float32":
                stage.model.to(stage.dtype)
            self.encoders[name] = stage.to(self.device)
        return self.encoders[name]  # type: ignore[return-value]

    @property
    def width(self) -> int:
        """``D``: the width of the encoder's features, tokens and query embeddings."""
        return int(self.encoder(self.config.buckets[0]).width)

    # --- inputs -----------------------------------------------------------------------------------------
    def prepare_query(self, query: Any, query_mask: Tensor | None = None, batch: int = 1) -> tuple[Tensor, Tensor]:
        """Normalise a query to ``(B, L, D)`` float32 plus a ``(B, L)`` bool mask: :func:`arrcoc.frontend.prepare_query`
        with this pipeline's width, device and text encoder."""
        return prepare_query(query, query_mask, batch, self.width, self.device, self.text_encoder)

    # --- running ----------------------------------------------------------------------------------------
    def stages(
        self,
        bucket: int,
        capacity: int = 0,
        *,
        concurrent: bool | None = None,
        compile: bool | Literal["head"] = False,
        pick: bool = True,
    ) -> list[Stage]:
        """The chain after preprocess for one bucket, in order, as ``(name, fn)``: encode, then the head's steps.

        Each ``fn`` reads named tensors from a state dict and returns the new ones; the chain starts from
        ``pixels``, ``valid``, ``query``, ``query_mask`` (and ``budget`` for allocation). With ``capacity=0`` it
        stops after balance (relevance only). The graph runner captures it; benchmarks time it step by step.

        Args:
            bucket: the bucket size.
            capacity: the token capacity ``T`` (0: relevance only).
            concurrent: side streams (default: the pipeline's setting): the backbone beside the texture and the
                allocation bounds, and the head's scoring branches.
            compile: ``torch.compile`` each branch and step (the graph runner asks for it when the pipeline
                compiles); ``"head"``: all but the backbone's features.
            pick: build the query-free pick (``BalanceConfig.pick``); ``False`` when every image has a question,
                since the pick is only read without one.
        """
        encoder, head = self.encoder(bucket), self.head
        concurrent = self.concurrent if concurrent is None else concurrent

        def body(fn: Callable[..., Any], compiled: bool) -> Callable[..., Any]:
            return torch.compile(fn, dynamic=False) if compiled else fn

        def layout(pixels: Tensor, valid: Tensor) -> tuple[Tensor, ...]:
            texture, patch_valid = encoder.layout(pixels, valid)
            if not capacity:  # relevance alone allocates nothing
                return texture, patch_valid
            return texture, patch_valid, *head.bounds(patch_valid)

        features_of, layout_of = body(encoder.features, compile is True), body(layout, bool(compile))

        # The image layout and the allocation bounds need no features: they run beside the backbone.
        def encode(s: dict[str, Any]) -> dict[str, Any]:
            pixels = s["pixels"]
            (features, prefix), layout_out = run_branches(
                (lambda: features_of(pixels), lambda: layout_of(pixels, s["valid"])), pixels.device, concurrent
            )
            return {"features": features, "prefix": prefix, **dict(zip(_LAYOUT_KEYS, layout_out))}

        steps = None if pick else 0
        head_steps = head.stages(capacity, concurrent=concurrent, compile=bool(compile), pick_steps=steps)
        return [("encode", encode), *head_steps]

    # --- graphs ----------------------------------------------------------------------------------------------
    def _graph_key(self, bucket: int, batch: int, capacity: int, query_tokens: int, pick: bool = True) -> GraphKey:
        return GraphKey(
            bucket,
            _batch_bucket(max(batch, self.graph_batch or 1)),
            ENCODER_DTYPES[self.config.encoder_dtype],
            self.device,
            capacity,
            _query_bucket(query_tokens),
            pick or not capacity,  # a chain without a budget has no pick either way
        )

    def _static_inputs(self, key: GraphKey) -> dict[str, Tensor]:
        b, s, device = key.batch, key.bucket, key.device
        inputs = {
            "pixels": torch.full((b, 3, s, s), 0.5, device=device),
            "valid": torch.ones(b, 1, s, s, device=device),
            "query": torch.zeros(b, key.query_tokens, self.width, device=device),
            "query_mask": torch.zeros(b, key.query_tokens, dtype=torch.bool, device=device),
        }
        if key.capacity:  # relevance-only chains take no budget
            inputs["budget"] = torch.ones(b, dtype=torch.long, device=device)
        return inputs

    def _build(
        self, key: GraphKey, compile: bool | Literal["head"] | None = None
    ) -> tuple[list[Any], dict[str, Tensor], tuple[str, ...]]:
        """What the cache captures for ``key``: the stages, their static inputs, the result keys (``compile``: as
        the pipeline's calls capture, plain where a helper thread compiles)."""
        if compile is None:
            compile = False if self.compiled_chains is not None else self.compile
        stages = self.stages(key.bucket, key.capacity, compile=compile, pick=key.pick)
        return stages, self._static_inputs(key), RESULT_KEYS

    def _cache_for(self, key: GraphKey) -> GraphCache:
        """The cache that serves ``key``: the compiled chains' once its compiled chain is captured, the plain graphs'
        until then; the first call after the plain chain's capture queues the compile."""
        chains = self.compiled_chains
        if chains is None or key not in self.graph_cache:  # the plain chain is captured first
            return self.graph_cache
        return chains.cache if chains.ready(key, self.graph_cache.capture_lock) else self.graph_cache

    def wait_for_compile(self, timeout: float | None = None) -> bool:
        """With ``compile_in_background``, block until the compiled chain of every graph key served so far is
        captured (or has failed and stays plain); returns whether that happened within ``timeout`` seconds (False at
        once for a deferred compile not started: see :meth:`start_compile`)."""
        return self.compiled_chains is None or self.compiled_chains.wait(timeout)

    def start_compile(self) -> None:
        """Start a deferred background compile (``compile_in_background="deferred"``): the graph keys served so far,
        then each new one once its plain chain is captured. Calling it again does nothing.

        Raises:
            InvalidInputError: the pipeline does not compile in the background.
        """
        if self.compiled_chains is None:
            raise InvalidInputError('start_compile needs compile_in_background=True or "deferred"')
        self.compiled_chains.start()

    @property
    def compile_started(self) -> bool:
        """Whether a background compile may run: ``compile_in_background=True``, or a deferred one started."""
        return self.compiled_chains is not None and self.compiled_chains.started

    def _uses_graphs(self, device: torch.device | None = None) -> bool:
        return self.cuda_graphs and ((device or self.device).type == "cuda" or self.graph_cache.backend == "eager")

    def _capture_failed(self, key: GraphKey, err: CaptureError) -> None:
        self._eager_only[key] = str(err)
        warnings.warn(f"arrcoc: running eagerly for {key.bucket}px, batch {key.batch}: {err}", stacklevel=5)

    def _chain(self, key: GraphKey, queue_compile: bool = True) -> Any:
        """The captured chain for ``key``, or None where capture failed (the stages then run eagerly);
        ``queue_compile``: then queue its compiled build (``compile_in_background``)."""
        if key in self._eager_only:
            return None
        try:
            if self.compiled_chains is None:
                return self.graph_cache.get(key, lambda: self._build(key))
            with self.compiled_chains.gate:  # waits for a build under way: see _run_graphed
                chain = self.graph_cache.get(key, lambda: self._build(key))
            if queue_compile:
                self._cache_for(key)
            return chain
        except CaptureError as err:
            self._capture_failed(key, err)
            return None

    def _run_graphed(self, key: GraphKey, state: dict[str, Any], batch: int, copy: bool) -> Mapping[str, Any] | None:
        """One call of ``key``'s graph (captured first if need be); None where this call must run eagerly.

        With ``compile_in_background`` a capture never runs beside a compile, which can void it (measured:
        ``docs/decisions.md``, compiled on a helper thread): a key whose plain chain is not captured yet runs
        eagerly while a build is under way, and is captured on a later call; once it is, its compiled build is
        queued.
        """
        cache = self._cache_for(key)
        chains = self.compiled_chains
        if chains is None or key in cache:
            return cache.run(key, lambda: self._build(key), graph_inputs(key, state), batch, copy)
        if not chains.gate.acquire(blocking=False):
            return None
        try:
            out = cache.run(key, lambda: self._build(key), graph_inputs(key, state), batch, copy)
        finally:
            chains.gate.release()
        self._cache_for(key)  # queues the compiled chain's build
        return out

    def warmup(
        self,
        sizes: Sequence[int] | None = None,
        batch_sizes: Sequence[int] = (1, 8, 64),
        *,
        budget: int = CAPACITY_STEP,
        query_tokens: int = 1,
        asked: bool | None = None,
    ) -> dict[str, Any]:
        """Capture the graphs up front, largest first (as serving engines do), so no call pays for a capture.

        Args:
            sizes: bucket sizes (default: all configured buckets).
            batch_sizes: batch sizes; each maps to its batch bucket.
            budget: the largest budget to serve; sets the token capacity of the entries.
            query_tokens: the longest query to serve, in tokens.
            asked: the calls to serve give every image a question (``True``: text, or an embedding without a
                mask), or not (``False``); ``None`` captures both kinds of compression chain (the query-free pick is
                left out of the chains for calls that ask every image).

        Returns:
            ``graph_cache.stats()`` after the captures.

        With ``compile_in_background`` the compiled builds are queued once every plain chain is captured (a capture
        waits for a build under way).
        """
        if not self._uses_graphs():
            return self.graph_cache.stats()
        capacity = self.config.token_capacity or token_capacity(budget)
        keys = [
            self._graph_key(size, batch, cap, query_tokens, pick)
            for size in sorted(sizes or self.config.buckets, reverse=True)
            for batch in sorted(batch_sizes, reverse=True)
            for cap in (capacity, 0)  # compression and relevance-only chains
            for pick in ({True: (False,), False: (True,), None: (True, False)}[asked] if cap else (True,))
        ]
        with torch.inference_mode():
            captured = [key for key in keys if self._chain(key, queue_compile=False) is not None]
            if self.compiled_chains is not None:
                for key in captured:
                    self._cache_for(key)  # queues its compiled build
        return self.graph_cache.stats()

    def _run_stages(
        self,
        state: dict[str, Any],
        bucket: int,
        capacity: int,
        timer: StageTimer,
        copy: bool = True,
        device: torch.device | None = None,
        pick: bool = True,
    ) -> Mapping[str, Any]:
        """Run one bucket's stages, as one graph when possible; returns the result entries.

        Graphed, the results are a :class:`~arrcoc.runtime.graphs.ChainResult`: the caller's own copies, or with
        ``copy=False`` views of the entry's buffers, valid until the entry's next replay.
        """
        batch = state["pixels"].shape[0]
        graphs = self._uses_graphs(device)
        key = self._graph_key(bucket, batch, capacity, state["query"].shape[1], pick) if graphs else None
        if key is not None and key not in self._eager_only:
            try:
                with timer("graphs"):
                    out = self._run_graphed(key, state, batch, copy)
                if out is not None:
                    return out
            except CaptureError as err:
                self._capture_failed(key, err)
        for name, stage in self.stages(bucket, capacity, pick=pick):
            with timer(name):
                state.update(stage(state))
        return {k: state[k] for k in RESULT_KEYS if k in state}

    @torch.inference_mode()
    def _run(
        self,
        images: Any,
        query: Any,
        query_mask: Tensor | None,
        budget: Any,
        profile: bool,
        copy: bool = True,
        budget_policy: str = "exact",
    ) -> ScoreOutput:
        device = self.device
        timer = StageTimer(profile, device) if profile else UNTIMED
        with timer("preprocess"):
            if isinstance(images, PreprocessedBatch):  # already letterboxed into one bucket (a data-set loader)
                if images.bucket not in self.config.buckets:
                    raise InvalidInputError(
                        f"a PreprocessedBatch of bucket {images.bucket} is not one of this "
                        f"pipeline's buckets {self.config.buckets}"
                    )
                groups = [images.to(device)]
            else:
                groups = self.preprocessor(images, device=device)
        batch = sum(len(g.indices) for g in groups)
        pick = not asks_every_image(query, query_mask)  # the query-free pick is only read without a question
        query, query_mask = self.prepare_query(query, query_mask, batch)
        budgets, capacity = (
            check_budgets(budget, groups, batch, lambda b: self.encoder(b).grid, self.config, budget_policy)
            if budget is not None
            else (None, 0)
        )

        if len(groups) == 1:  # one bucket, images in order: the results are already the call's own (or zero-copy)
            (group,) = groups
            state: dict[str, Any] = {
                "pixels": group.pixels,
                "valid": group.valid,
                "query": query,
                "query_mask": query_mask,
                "budget": budget_tensor(budgets, device),
            }
            merged: Mapping[str, Any] = self._run_stages(state, group.bucket, capacity, timer, copy, device, pick)
            names = list(group.names)
        else:
            side = self.config.region_size
            grids = [region_grid(self.encoder(g.bucket).grid, side) for g in groups]
            rh, rw = max(g[0] for g in grids), max(g[1] for g in grids)
            merged, names = {}, [""] * batch
            for group in groups:
                index = torch.tensor(group.indices, device=device)
                rows = None if budgets is None else [budgets[i] for i in group.indices]
                state = {
                    "pixels": group.pixels,
                    "valid": group.valid,
                    "query": query[index],
                    "query_mask": query_mask[index],
                    "budget": budget_tensor(rows, device),
                }
                result = self._run_stages(state, group.bucket, capacity, timer, device=device, pick=pick)
                scatter_into(merged, result, index, batch, (rh, rw))
                for i, name in zip(group.indices, group.names):
                    names[i] = name

        return build_output(
            merged, groups, self._grids, batch, budgets, names, self.config.region_size, timer.times if profile else {}
        )

    def _grids(self, bucket: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(region grid, patch grid)`` of a bucket."""
        grid = self.encoder(bucket).grid
        return region_grid(grid, self.config.region_size), grid

    def forward(
        self,
        images: Any,
        query: Any = None,
        budget: int | Sequence[int] | Tensor = 256,
        *,
        query_mask: Tensor | None = None,
        budget_policy: str = "exact",
        profile: bool = False,
        copy: bool = True,
    ) -> CompressionOutput:
        """Compress images to ``budget`` tokens each.

        Args:
            images: a path, PIL image, array or tensor, or a list mixing them (any size, any PIL mode); or a
                :class:`~arrcoc.stages.preprocess.PreprocessedBatch` of one bucket, letterboxed already.
            query: ``None``; an embedding of width ``D`` shaped ``(D,)``, ``(L, D)`` or ``(B, L, D)``; or a
                string (needs a trained text encoder).
            budget: tokens per image: one whole number, or one per image; from 1 to the image's real patches
                (those its content touches in its bucket: a token never stands for padding).
            query_mask: ``(L,)`` or ``(B, L)`` bool, True on real query tokens (padding never counts).
            budget_policy: ``"exact"``: a budget above an image's real patches is a :class:`BudgetError`;
                ``"cap"``: it is lowered to them, and ``out.budget`` reports the budget each image used.
            profile: record milliseconds per stage in ``out.timings`` (synchronises the device).
            copy: with CUDA graphs, ``False`` returns views of the graph entry's own buffers instead of copies
                (zero-copy) when all images fall in one bucket. They stay valid until the next call that
                uses the same entry (same bucket, batch bucket, capacity and query bucket); reading a field
                of the output after that raises :class:`~arrcoc.runtime.graphs.StaleOutputError`. Eagerly the
                results are always the caller's own.

        Returns:
            :class:`CompressionOutput`.
        """
        if budget is None:  # None means relevance only: that is score(), not a compression
            raise BudgetError(
                "budget must be a positive whole number of tokens, or one per image; got None "
                "(for relevance maps without compression, call Pipeline.score)"
            )
        return self._run(images, query, query_mask, budget, profile, copy, budget_policy)  # type: ignore[return-value]

    def score(
        self,
        images: Any,
        query: Any = None,
        *,
        query_mask: Tensor | None = None,
        profile: bool = False,
        copy: bool = True,
    ) -> ScoreOutput:
        """Relevance only: the three maps and the balanced relevance, no allocation or compression.

        ``copy`` as in :meth:`forward`.
        """
        return self._run(images, query, query_mask, None, profile, copy)


def graph_inputs(key: GraphKey, state: dict[str, Any]) -> dict[str, Tensor]:
    """A call's values for a chain's static inputs, each ``(batch, ...)`` with the entry's trailing shapes.

    A query shorter than the entry's query bucket is padded with masked-out zero tokens. Padding rows of
    the batch bucket are not written: they keep an earlier call's (finite) inputs, and no stage mixes rows.
    """
    values = {
        "pixels": state["pixels"],
        "valid": state["valid"],
        "query": state["query"],
        "query_mask": state["query_mask"],
    }
    if key.capacity:
        values["budget"] = state["budget"]
    missing = key.query_tokens - values["query"].shape[1]
    if missing:
        values["query"] = F.pad(values["query"], (0, 0, 0, missing))
        values["query_mask"] = F.pad(values["query_mask"], (0, missing))
    return values


#: What the encode stage's layout branch returns, in order (the bounds only for a chain that allocates).
_LAYOUT_KEYS = ("texture", "patch_valid", "min_tokens", "max_tokens")
