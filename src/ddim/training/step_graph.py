"""The whole training step's gradient work as one CUDA graph (``fast.step_graph``), and the DDP strategy for it.

``GradientGraph`` replays forward, backward, the gradient all-reduce and clipping in one graph, so the GPU no
longer waits for Lightning's Python loop between kernels; ``StepGraphDDPStrategy`` gives it DDP's processes and data
sharding without DistributedDataParallel's own all-reduce.
"""
from __future__ import annotations

import atexit
import itertools
import weakref
from collections.abc import Mapping
from typing import Any, Callable

import torch
from lightning.pytorch.strategies import DDPStrategy

_LIVE_GRADIENT_GRAPHS: weakref.WeakSet = weakref.WeakSet()


def release_gradient_graphs() -> None:
    """``release()`` every live ``GradientGraph``.  Registered with ``atexit`` anew whenever one is made, which is
    after ``init_process_group``, so it runs before the exit handlers that destroy the process group (Lightning
    registers one): an own DDP script that forgets ``release()`` still exits."""
    for g in list(_LIVE_GRADIENT_GRAPHS):
        g.release()


class GradientGraph:
    """``loss_fn(x)``'s forward, backward, gradient all-reduce (mean over the ranks) and norm clipping as one CUDA
    graph; on a CPU the same calls run eagerly.  Returns ``(loss, pre-clip gradient norm)``, device tensors.

    Why: with per-region CUDA graphs the host time of Lightning's loop (and of DDP's hooks between the graph
    pieces Dynamo splits at gradient buckets) exceeds the GPU work of a CIFAR-10 step, so the GPU waits for
    Python.  One replay per step leaves the host only the optimizer step and the EMA.  The gradients live in one
    flat fp32 buffer (each ``p.grad`` a view with ``p``'s strides), so the all-reduce is one collective and the
    clipping one product.
    Everything random in ``loss_fn`` (t, ε, dropout) is drawn inside the graph, from fresh numbers each replay.

    One graph per input shape, captured after ``warmup`` eager calls (compilation, cuDNN autotuning; they
    compute gradients but change no parameter).  ``loss_fn`` must be capturable: no host syncs, no CUDA
    graphs of its own (compile it without ``mode="reduce-overhead"``).
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], params: list[torch.Tensor], *,
                 grad_clip: float | None = None, all_reduce: bool | None = None, cuda_graph: bool = True,
                 warmup: int = 2):
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip}")
        self.loss_fn = loss_fn
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("GradientGraph needs at least one parameter that requires grad")
        self.grad_clip = grad_clip
        dist = torch.distributed
        self.all_reduce = (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
                           if all_reduce is None else all_reduce)
        self.cuda_graph = cuda_graph
        self.warmup = warmup
        self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=torch.float32, device=self.params[0].device)
        self.bind_grads()
        self._graphs: dict[tuple, tuple] = {}
        atexit.unregister(release_gradient_graphs)  # registered anew, so last: atexit runs the last first
        atexit.register(release_gradient_graphs)
        _LIVE_GRADIENT_GRAPHS.add(self)

    def bind_grads(self) -> None:
        """Point every ``p.grad`` at its slice of the flat buffer, in ``p``'s own strides (channels_last stays)."""
        offset = 0
        for p in self.params:
            if p.dtype != torch.float32:
                raise ValueError(f"GradientGraph keeps fp32 gradients; got a {p.dtype} parameter of shape {tuple(p.shape)}")
            p.grad = self.flat[offset: offset + p.numel()].as_strided(p.shape, p.stride())
            offset += p.numel()
        self._grads = [p.grad for p in self.params]

    def _step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.flat.zero_()
        loss = self.loss_fn(x)
        loss.backward()  # accumulates into the zeroed views in place (grad mode is off inside backward)
        if self.all_reduce:
            torch.distributed.all_reduce(self.flat)
            self.flat.div_(torch.distributed.get_world_size())
        # per-tensor norms, then their norm, as clip_grad_norm_ (one fp32 sum over all 36M entries drifts ~1e-5)
        norm = torch.nn.utils.get_total_norm(self._grads, foreach=self.flat.device.type == "cuda" or None)
        if self.grad_clip is not None:  # torch.nn.utils.clip_grad_norm_'s rule
            self.flat.mul_(torch.clamp(self.grad_clip / (norm + 1e-6), max=1.0))
        return loss.detach(), norm

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if any(p.grad is not g for p, g in zip(self.params, self._grads)):  # e.g. optimizer.zero_grad() set None
            self.bind_grads()  # the graph writes the flat buffer, so new views of it are all it takes
        if x.device.type != "cuda" or not self.cuda_graph:
            return self._step(x)
        key = (tuple(x.shape), x.stride(), x.dtype)
        if key not in self._graphs:
            self._graphs[key] = self._capture(x)
        graph, static_x, static_loss, static_norm = self._graphs[key]
        static_x.copy_(x)
        graph.replay()
        return static_loss.clone(), static_norm.clone()

    def release(self) -> None:
        """Free the captured graphs (a later call captures again).  Call it before ``destroy_process_group``:
        NCCL's communicator teardown waits for graphs that captured its collectives (pytorch/pytorch#115388),
        so a run would finish its work and then hang at exit."""
        graphs, self._graphs = list(self._graphs.values()), {}
        for graph, *_ in graphs:
            graph.reset()

    def _capture(self, x: torch.Tensor) -> tuple:
        static_x = x.clone()
        device = x.device
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        # autocast's cast cache must not hold tensors of the graph's memory pool past the capture.  The warm-up
        # runs under the same autocast state: torch.compile guards on it, and a recompilation inside the capture
        # would time (autotune) its new kernels there, which synchronises and breaks the capture.
        def same_autocast():
            return torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), same_autocast():  # warm-up off the capturing stream, as torch.cuda.graph wants
            for _ in range(self.warmup):
                self._step(static_x)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with same_autocast(), torch.cuda.graph(graph):
            static_loss, static_norm = self._step(static_x)
        return graph, static_x, static_loss, static_norm


def broadcast_module_states(module: torch.nn.Module, src: int = 0) -> None:
    """Every rank's parameters and buffers set to rank ``src``'s, as DistributedDataParallel's constructor does."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            dist.broadcast(tensor.data, src=src)


def mode_has_cuda_graphs(mode: str | None) -> bool:
    """Whether torch.compile's ``mode`` wraps the compiled regions in CUDA graphs (cudagraph trees)."""
    return mode in ("reduce-overhead", "max-autotune")


def check_strategy_pairing(strategy: str, fast: Mapping[str, Any], gradient_as_bucket_view: bool = False) -> None:
    """Refuse the DDP pairings that train on wrong gradients.  ``strategy``: ``"ddp"`` (DistributedDataParallel
    wraps the model), ``"ddp_step_graph"`` (``StepGraphDDPStrategy``) or anything else; ``fast``: the checked fast
    settings.  train.py calls it from the config before anything is built, the strategies again at run time."""
    if strategy == "ddp_step_graph" and not fast["step_graph"]:
        raise ValueError("StepGraphDDPStrategy (trainer=ddp_step_graph) does not all-reduce gradients itself: it "
                         "needs fast.step_graph=true, whose graphed step does; use trainer=ddp otherwise")
    if strategy != "ddp":
        return
    if fast["compile"] and mode_has_cuda_graphs(fast["mode"]) and gradient_as_bucket_view:
        raise ValueError(f"DDP with gradient_as_bucket_view=true and fast.mode={fast['mode']!r} (CUDA graphs) trains "
                         "on wrong gradients: set trainer.strategy.gradient_as_bucket_view=false, or use "
                         "trainer=ddp_step_graph fast.step_graph=true")
    if fast["step_graph"]:
        raise ValueError("fast.step_graph=true all-reduces the gradients inside its CUDA graph, and "
                         "DistributedDataParallel would all-reduce them again: use trainer=ddp_step_graph "
                         "(ddim.training.step_graph.StepGraphDDPStrategy), not DDPStrategy")


class StepGraphDDPStrategy(DDPStrategy):
    """DDP's processes, process group and data sharding without the DistributedDataParallel wrapper, for
    ``fast.step_graph=true``: its CUDA-graphed step all-reduces the gradients itself, as one collective
    inside the graph (``GradientGraph``), instead of DDP's per-bucket hooks between graph pieces."""

    def configure_ddp(self) -> None:
        check_strategy_pairing("ddp_step_graph", {"step_graph": not self.lightning_module.automatic_optimization})
        broadcast_module_states(self.model)  # every replica starts from rank 0's weights

    def teardown(self) -> None:
        # before Lightning's exit handler destroys the process group, which hangs while a graph holding its
        # all-reduce lives (GradientGraph.release); the trainer tears the strategy down after errors too
        release = getattr(self.lightning_module, "release_step_graph", None)
        if release is not None:
            release()
        super().teardown()
