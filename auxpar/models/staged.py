"""The staged form of a residual network and its partition into K stages.

Every model in auxpar is a :class:`StagedNet`: ``stem -> blocks[0] -> ... -> blocks[N-1] -> head``
(algorithms.md, section 1). Layer-parallel training cuts the ordered ``blocks`` into K
contiguous stages; stage 0 also owns the stem and stage K-1 the head. A :class:`Stage` holds
*references* to the net's modules, never copies, so

* chaining ``stages[0](x) -> stages[1](.) -> ...`` is the net's forward, op for op, and
* the initial parameters never depend on K: the whole net is built from one seed in one pass
  and only then sliced (algorithms.md, section 7).

In a multi-process run each rank builds the full net from the shared seed and keeps only
``net.partition(K)[rank]`` (or ``net.stage_module(rank, K)``). A Stage keeps no reference to
the net, so once the caller drops the net the other stages' parameters are freed. Building the
whole net once per rank costs memory for a moment (36.5M parameters for WRN-28-10, ~146 MB in
fp32); that is accepted for now because it is the simplest way to make the initial weights
independent of K.

Costs and shapes are measured, not derived: one forward of a zeros batch of shape
``(1, in_channels, input_size, input_size)`` in eval mode under ``torch.no_grad()`` records,
with forward hooks, 2 * MACs of every Conv2d and Linear, attributed to the part (stem, block j,
head) that was running, and the per-sample output shape of the stem and of every block.
BatchNorm, ReLU, pooling, additions and the step scaling are not counted: they are a few
percent of the convolution work and do not change the balance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from auxpar.errors import ConfigError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class _Trace:
    """Result of the shape/cost tracing forward (per sample, batch size 1)."""

    stem_flops: int
    block_flops: tuple[int, ...]
    head_flops: int
    stem_shape: Shape
    block_shapes: tuple[Shape, ...]


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters (``module.parameters()`` already skips shared duplicates)."""
    return sum(p.numel() for p in module.parameters())


def _flops_of(module: nn.Module, output: torch.Tensor) -> int:
    """2 * multiply-accumulates of one Conv2d or Linear call, for the batch it ran on.

    Conv2d: every output element costs (C_in / groups) * kH * kW MACs.
    Linear: every output element costs in_features MACs. Biases are not counted.
    """
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        macs = output.numel() * (module.in_channels // module.groups) * kh * kw
    elif isinstance(module, nn.Linear):
        macs = output.numel() * module.in_features
    else:  # pragma: no cover - hooks are registered on Conv2d/Linear only
        return 0
    return 2 * macs


class StagedNet(nn.Module):
    """A residual network as ``stem -> blocks -> head``, ready to be cut into stages.

    Attributes:
        stem: input ``(B, in_channels, S, S)`` -> first state ``(B, C0, H0, W0)``.
        blocks: ordered residual blocks; each maps one tensor to one tensor. That is all the
            penalty/AL, pipeline, serial and DDP methods need. MGRIT also needs a ``step``
            attribute the forward uses (``shortcut(x) + step * residual(x)``, see
            :class:`ResidualBlock`); ``is_transition`` (shape-changing block) is read when
            present and measured otherwise.
        head: last state ``(B, C, H, W)`` -> logits ``(B, num_classes)``.
        name: canonical model name, e.g. ``"resnet20"`` or ``"wrn-28-10"``.
        in_channels, input_size, num_classes: what the net was built for; ``input_size``
            matters only for the measured costs and shapes (the convolutions accept any size).
    """

    def __init__(
        self,
        stem: nn.Module,
        blocks: Sequence[nn.Module],
        head: nn.Module,
        *,
        name: str,
        in_channels: int,
        input_size: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = blocks if isinstance(blocks, nn.ModuleList) else nn.ModuleList(blocks)
        self.head = head
        self.name = name
        self.in_channels = in_channels
        self.input_size = input_size
        self.num_classes = num_classes
        self._trace_cache: _Trace | None = None
        self.block_ids: tuple[int, ...] = tuple(range(len(self.blocks)))
        """The original block each of ``blocks`` belongs to (:meth:`split_blocks` makes two
        units of one block; otherwise ``blocks[j]`` is block j)."""
        self.cut_blocks: tuple[int, ...] = ()
        """The original blocks that :meth:`split_blocks` cut in two."""

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, in_channels, S, S) -> logits (B, num_classes)
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    # ------------------------------------------------------------------ structure
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def input_shape(self) -> Shape:
        """Per-sample input shape (C, H, W) the net was built for."""
        return (self.in_channels, self.input_size, self.input_size)

    def transition_indices(self) -> list[int]:
        """Global indices of the blocks that change shape (stride 2 or channel change).

        A block's own ``is_transition`` decides; a block without one (a user's block) is a
        transition when its output shape differs from its input shape (measured)."""
        out = []
        shapes = None
        for j, b in enumerate(self.blocks):
            flag = getattr(b, "is_transition", None)
            if flag is None:
                shapes = self.boundary_shapes() if shapes is None else shapes
                flag = shapes[j] != shapes[j + 1]
            if flag:
                out.append(j)
        return out

    def set_step(self, step: float) -> None:
        """Set the residual scaling h of every block (x -> shortcut(x) + h * residual(x)).

        ``step`` is a plain attribute, not a buffer: it is not saved in state_dict, the caller
        (e.g. the MGRIT backend) sets it from its config. h = 1.0 is the standard ResNet.
        Every block must already have a ``step`` attribute that its forward uses (the built-in
        blocks and :class:`ResidualBlock` do): MGRIT runs blocks at several step sizes, and a
        block that ignored it would silently give wrong coarse-grid propagators.
        """
        for j, block in enumerate(self.blocks):
            if not hasattr(block, "step"):
                raise ConfigError(
                    f"--method mgrit runs every block as x -> shortcut(x) + h * residual(x) at several "
                    f"step sizes h, but block {j} ({type(block).__name__}) of {self.name} has no 'step' "
                    "attribute: subclass auxpar.ResidualBlock (define residual(x), and shortcut(x) when "
                    "the block changes the shape), or give the block a float attribute 'step' (1.0) that "
                    "its forward uses as shortcut(x) + step * residual(x); the other methods need only "
                    "forward")
            block.step = float(step)

    def split_blocks(self, indices: Sequence[int]) -> "StagedNet":
        """This net with each block in ``indices`` cut in two units, so a stage boundary can
        fall inside it (a finer balance than whole blocks: ResNet-20 on 28x28 images has 9
        blocks of unequal time, and its best whole-block cut at K = 2 leaves one stage about 20%
        slower than the other).

        A block is cut by its ``split()`` method, which returns ``(head, tail)`` with
        ``tail(head(x)) == block(x)``, each half owning the block's submodules it runs under
        their own names; the built-in ResNet, pre-activation ResNet and WRN blocks have one (the
        state between the halves: the first convolution's activation and the shortcut's input,
        concatenated along the channels). The modules are this net's own objects, so the
        function, the parameters and the initialization do not change; only the unit list
        (``blocks``, what a cut counts) does, and :meth:`original_key` maps state_dict keys back
        to the uncut net's (model.pt loads into ``build_model`` as always).
        """
        idx = sorted({int(i) for i in indices})
        if not idx:
            return self
        if self.cut_blocks:
            raise ConfigError(f"{self.name}: split_blocks applies to an uncut net (already cut: {list(self.cut_blocks)})")
        n = len(self.blocks)
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise ConfigError(f"model.split_blocks = {list(indices)}: {self.name} has blocks 0..{n - 1}, "
                              f"so {bad} do not exist")
        units, ids = [], []
        for j, block in enumerate(self.blocks):
            if j in idx:
                split = getattr(block, "split", None)
                if not callable(split):
                    raise ConfigError(
                        f"model.split_blocks: block {j} ({type(block).__name__}) of {self.name} cannot be cut in "
                        "two: it has no split() method. Give it one that returns (head, tail) with "
                        "tail(head(x)) == block(x), or cut the net between whole blocks")
                head, tail = split()
                units += [head, tail]
                ids += [j, j]
            else:
                units.append(block)
                ids.append(j)
        net = StagedNet(self.stem, units, self.head, name=self.name, in_channels=self.in_channels,
                        input_size=self.input_size, num_classes=self.num_classes)
        net.block_ids, net.cut_blocks = tuple(ids), tuple(idx)
        net.train(self.training)
        return net

    def unit_names(self) -> list[str]:
        """A name per unit: the block index, with "a"/"b" for the halves of a cut block."""
        names = []
        for u, b in enumerate(self.block_ids):
            if b in self.cut_blocks:
                names.append(f"{b}{'a' if u == 0 or self.block_ids[u - 1] != b else 'b'}")
            else:
                names.append(str(b))
        return names

    def original_key(self, key: str) -> str:
        """A state_dict key of this net under the uncut net's names (``blocks.<unit>.`` ->
        ``blocks.<block>.``; the halves of a cut block own disjoint submodule names)."""
        return original_key(key, self.block_ids)

    # ------------------------------------------------------------------ costs and shapes
    def _trace(self) -> _Trace:
        if self._trace_cache is not None:
            return self._trace_cache
        try:
            ref = next(self.parameters())
            device, dtype = ref.device, ref.dtype
        except StopIteration:  # pragma: no cover - every model has parameters
            device, dtype = torch.device("cpu"), torch.get_default_dtype()

        counter = [0]

        def hook(module: nn.Module, _inputs, output) -> None:
            counter[0] += _flops_of(module, output)

        handles = [
            m.register_forward_hook(hook)
            for m in self.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))
        ]
        # Eval mode: BN uses (and does not update) its running stats and dropout is off, so the
        # trace neither changes the model nor consumes torch's RNG. Restore every module's own
        # flag afterwards, not just the root's.
        modes = {m: m.training for m in self.modules()}
        self.eval()
        try:
            with torch.no_grad():
                x = torch.zeros((1, *self.input_shape), device=device, dtype=dtype)
                counter[0] = 0
                x = self.stem(x)
                stem_flops, stem_shape = counter[0], tuple(x.shape[1:])
                block_flops, block_shapes = [], []
                for block in self.blocks:
                    counter[0] = 0
                    x = block(x)
                    block_flops.append(counter[0])
                    block_shapes.append(tuple(x.shape[1:]))
                counter[0] = 0
                x = self.head(x)
                head_flops = counter[0]
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes.items():
                m.training = mode
        self._trace_cache = _Trace(
            stem_flops=int(stem_flops),
            block_flops=tuple(int(f) for f in block_flops),
            head_flops=int(head_flops),
            stem_shape=stem_shape,
            block_shapes=tuple(block_shapes),
        )
        return self._trace_cache

    def costs(self, batch_size: int = 1) -> tuple[int, list[int], int]:
        """Estimated forward FLOPs ``(stem, [block_0 .. block_{N-1}], head)`` for a batch.

        Measured once at batch size 1 (cached) and scaled linearly: every counted layer is
        per-sample work.
        """
        t = self._trace()
        b = int(batch_size)
        return t.stem_flops * b, [f * b for f in t.block_flops], t.head_flops * b

    def block_costs(self, batch_size: int = 1) -> list[int]:
        return self.costs(batch_size)[1]

    def stem_cost(self, batch_size: int = 1) -> int:
        return self.costs(batch_size)[0]

    def head_cost(self, batch_size: int = 1) -> int:
        return self.costs(batch_size)[2]

    def total_flops(self, batch_size: int = 1) -> int:
        stem, blocks, head = self.costs(batch_size)
        return stem + sum(blocks) + head

    def boundary_shapes(self) -> list[Shape]:
        """Per-sample shapes ``[stem_out, block_0_out, ..., block_{N-1}_out]`` as (C, H, W).

        The state entering block j has shape ``boundary_shapes()[j]``; the state leaving it
        ``boundary_shapes()[j + 1]``.
        """
        t = self._trace()
        return [t.stem_shape, *t.block_shapes]

    # ------------------------------------------------------------------ partition
    def partition(self, K: int, split: Sequence[int] | str | None = None) -> list[Stage]:
        """Cut the net into K stages (balanced by forward cost unless ``split`` is given)."""
        counts = partition_counts(self, K, split)
        return [self._make_stage(k, counts) for k in range(len(counts))]

    def stage_module(self, k: int, K: int, split: Sequence[int] | str | None = None) -> Stage:
        """Only stage k of ``partition(K, split)``: what rank k of a K-stage run keeps."""
        counts = partition_counts(self, K, split)
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < len(counts):
            raise ConfigError(
                f"stage index {k!r} is out of range for {len(counts)} stages; "
                f"use an index in 0..{len(counts) - 1}"
            )
        return self._make_stage(k, counts)

    def _make_stage(self, k: int, counts: Sequence[int]) -> Stage:
        K = len(counts)
        start = sum(counts[:k])
        stop = start + counts[k]
        shapes = self.boundary_shapes()
        in_shape = self.input_shape if k == 0 else shapes[start]
        out_shape: Shape = (self.num_classes,) if k == K - 1 else shapes[stop]
        stage = Stage(
            index=k,
            num_stages=K,
            block_range=(start, stop),
            block_ids=self.block_ids[start:stop],
            blocks=[self.blocks[j] for j in range(start, stop)],
            stem=self.stem if k == 0 else None,
            head=self.head if k == K - 1 else None,
            in_shape=in_shape,
            out_shape=out_shape,
            model_name=self.name,
        )
        # Mirror the net's mode on the wrapper's own flag (its submodules are the net's).
        stage.training = self.training
        return stage

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, in_channels={self.in_channels}, "
            f"input_size={self.input_size}, num_classes={self.num_classes}, "
            f"blocks={self.num_blocks}"
        )


class Stage(nn.Module):
    """Stage k of K: ``[stem] -> blocks[start:stop] -> [head]``, sharing the net's modules.

    The modules are the net's own objects (same parameters, same BN buffers), so an optimizer
    over ``stage.parameters()`` updates the net and ``stage.train()/eval()`` switches the
    net's modules. The stage keeps no reference to the net itself.

    Attributes:
        index, num_stages: k and K.
        block_range: ``(start, stop)`` global block indices, stop exclusive.
        blocks: the stage's blocks (references).
        stem / head: the net's stem (stage 0 only) / head (stage K-1 only), else None.
        is_first, is_last: ``index == 0`` / ``index == num_stages - 1``.
        in_shape: per-sample input shape: the raw input (C, S, S) for stage 0, else the
            boundary shape (C, H, W) after block ``start - 1``.
        out_shape: per-sample output shape: the boundary shape after block ``stop - 1``, or
            ``(num_classes,)`` for the last stage.
        model_name: the net's name, for logs.
    """

    def __init__(
        self,
        *,
        index: int,
        num_stages: int,
        block_range: tuple[int, int],
        blocks: Sequence[nn.Module],
        block_ids: Sequence[int] | None = None,
        stem: nn.Module | None,
        head: nn.Module | None,
        in_shape: Shape,
        out_shape: Shape,
        model_name: str = "",
    ) -> None:
        super().__init__()
        self.index = index
        self.num_stages = num_stages
        self.block_range = (int(block_range[0]), int(block_range[1]))
        # the uncut net's block index of every unit (a block cut in two gives two units)
        self.block_ids = tuple(int(i) for i in (block_ids if block_ids is not None else range(*self.block_range)))
        # register_module accepts None: the attribute exists and parameters() skips it.
        self.register_module("stem", stem)
        self.blocks = nn.ModuleList(blocks)
        self.register_module("head", head)
        self.is_first = index == 0
        self.is_last = index == num_stages - 1
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.model_name = model_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, *in_shape) -> (B, *out_shape)
        if self.stem is not None:
            x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        if self.head is not None:
            x = self.head(x)
        return x

    def extra_repr(self) -> str:
        return (
            f"index={self.index}/{self.num_stages}, block_range={self.block_range}, "
            f"in_shape={self.in_shape}, out_shape={self.out_shape}"
        )


# ---------------------------------------------------------------------- user networks
def original_key(key: str, block_ids: Sequence[int]) -> str:
    """``blocks.<i>.rest`` -> ``blocks.<block_ids[i]>.rest`` (unit i's block in the uncut net);
    other keys as they are."""
    if key.startswith("blocks."):
        _, i, rest = key.split(".", 2)
        return f"blocks.{block_ids[int(i)]}.{rest}"
    return key


class ResidualBlock(nn.Module):
    """Base class for a user's residual block: ``x -> shortcut(x) + step * residual(x)``.

    Subclass it and define :meth:`residual` (and :meth:`shortcut` when the block changes the
    shape; the default is the identity). ``step`` (h, default 1.0) is what ``--method mgrit``
    scales on its coarse grids; with h = 1 the multiplication is skipped. Any ``nn.Module``
    mapping one tensor to one tensor works as a block for the other methods.
    """

    def __init__(self) -> None:
        super().__init__()
        self.step: float = 1.0

    def residual(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must define residual(x)")

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.residual(x)
        if self.step != 1.0:
            r = self.step * r
        return self.shortcut(x) + r


def _describe(module: nn.Module) -> str:
    return type(module).__name__


def _shape_text(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"


def dry_forward(stem: nn.Module, blocks: Sequence[nn.Module], head: nn.Module, input_shape: Shape) -> int:
    """Run a zeros batch of 2 through ``stem -> blocks -> head`` and return the number of classes.

    Eval mode (BatchNorm uses and does not update its running statistics, dropout is off) under
    ``torch.no_grad()``; every module's own training flag is restored afterwards, so the modules
    are left exactly as they were. Raises ConfigError naming the part that does not fit.
    """
    parts = [("the stem", stem)] + [(f"block {j} ({_describe(b)})", b) for j, b in enumerate(blocks)]
    parts.append(("the head", head))
    for what, m in parts:
        if not isinstance(m, nn.Module):
            raise ConfigError(f"{what} must be a torch.nn.Module, got {type(m).__name__}; wrap plain "
                              "functions in a module (e.g. nn.Flatten, or a small nn.Module subclass)")
    tensors = [t for _, m in parts for t in (*m.parameters(), *m.buffers())]
    ref = next((t for t in tensors if t.is_floating_point()), None)
    kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}  # else torch's defaults
    modes = {m: m.training for _, part in parts for m in part.modules()}
    for _, part in parts:
        part.eval()
    try:
        with torch.no_grad():
            x = torch.zeros((2, *input_shape), **kw)
            prev = f"the input of shape {tuple(x.shape)}"
            for what, m in parts:
                try:
                    y = m(x)
                except Exception as exc:  # noqa: BLE001 - the user's module: name it and the shape it got
                    raise ConfigError(
                        f"{what} cannot take {prev}: {type(exc).__name__}: {str(exc).strip()[:300]}; "
                        "check that each part's output shape is what the next part expects") from None
                if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[0] != x.shape[0]:
                    raise ConfigError(
                        f"{what} returned {_shape_text(y)} for a batch of {x.shape[0]}: every part must "
                        "return one tensor whose first dimension is the batch")
                prev = f"the output of {what}, {_shape_text(y)}"
                x = y
    finally:
        for m, mode in modes.items():
            m.training = mode
    if x.dim() != 2:
        raise ConfigError(
            f"the head must return logits of shape (batch, num_classes), but it returned {_shape_text(x)}; "
            "end it with e.g. nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)")
    return int(x.shape[1])


def staged_net(
    stem: nn.Module,
    blocks: Sequence[nn.Module],
    head: nn.Module,
    *,
    input_shape: Sequence[int],
    num_classes: int | None = None,
    name: str = "custom",
) -> StagedNet:
    """A :class:`StagedNet` from a user's stem, residual blocks and head.

    ``input_shape`` is one sample's ``(C, H, W)`` (square images, H == W). The shapes between
    the parts and the number of classes are measured by one forward of a zeros batch of 2 in
    eval mode (running statistics untouched, see :func:`dry_forward`); ``num_classes``, when
    given, must match the head's output. Errors name the part that does not fit and the shape it
    was given. The modules are used as they are (no copy, no re-initialization).
    """
    shape = _check_input_shape(input_shape)
    if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ConfigError(f"blocks must be a list of residual blocks, got one {type(blocks).__name__}; "
                          "pass [block] for a single block")
    try:
        blocks = list(blocks)
    except TypeError:
        raise ConfigError(f"blocks must be a list of nn.Module residual blocks, got {type(blocks).__name__}") from None
    if not blocks:
        raise ConfigError("blocks is empty: a staged network needs at least one block (one per stage at least)")
    classes = dry_forward(stem, blocks, head, shape)
    if num_classes is not None and int(num_classes) != classes:
        raise ConfigError(f"the head returns {classes} logits per sample but num_classes = {num_classes}; "
                          f"give the head's last layer {num_classes} outputs")
    return StagedNet(stem, blocks, head, name=name, in_channels=shape[0], input_size=shape[1],
                     num_classes=classes)


def _check_input_shape(input_shape) -> Shape:
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or any(v < 1 for v in shape):
        raise ConfigError(f"input_shape = {input_shape!r} must be one sample's (channels, height, width), "
                          "e.g. (1, 8, 8) for digits or (3, 32, 32) for CIFAR")
    if shape[1] != shape[2]:
        raise ConfigError(f"input_shape = {shape}: auxpar models take square images (height == width); "
                          "pad or crop the images to a square")
    return shape


def check_staged_net(net: StagedNet, in_channels: int, input_size: int, num_classes: int, source: str) -> StagedNet:
    """Check that a user's StagedNet fits the data (``source`` names where it came from)."""
    if (net.in_channels, net.input_size) != (in_channels, input_size):
        raise ConfigError(
            f"{source} was built for inputs {net.input_shape} but the data has {(in_channels, input_size, input_size)}; "
            "build it with the data's in_channels and input_size")
    classes = dry_forward(net.stem, list(net.blocks), net.head, net.input_shape)
    if classes != num_classes or net.num_classes != num_classes:
        raise ConfigError(f"{source} returns {classes} logits per sample but the data has {num_classes} "
                          "classes; give the head's last layer that many outputs")
    return net


# ---------------------------------------------------------------------- splitting
def parse_split(s: str) -> list[int]:
    """Parse a split string such as ``"4,4,4"`` (blocks per stage) into ``[4, 4, 4]``.

    Only the syntax is checked here; :func:`partition_counts` checks the counts against K and
    the model.
    """
    if not isinstance(s, str):
        raise ConfigError(
            f"split must be text like '4,4,4' (blocks per stage), got {type(s).__name__} {s!r}"
        )
    text = s.strip()
    if not text:
        raise ConfigError(
            "split is empty; give comma-separated blocks per stage, e.g. '3,3,3' for 3 stages"
        )
    counts = []
    for token in text.split(","):
        token = token.strip()
        try:
            counts.append(int(token))
        except ValueError:
            raise ConfigError(
                f"split {s!r}: {token!r} is not an integer; give comma-separated whole numbers "
                f"of blocks per stage, e.g. '3,3,3'"
            ) from None
    return counts


def _resolve_costs(costs_or_net) -> tuple[float, list[float], float, str]:
    """Accept a StagedNet, ``(stem, [blocks], head)`` or a flat list of block costs."""
    if isinstance(costs_or_net, StagedNet):
        stem, blocks, head = costs_or_net.costs()
        return stem, list(blocks), head, costs_or_net.name
    seq = list(costs_or_net)
    if len(seq) == 3 and isinstance(seq[1], (list, tuple)):
        return seq[0], list(seq[1]), seq[2], "the model"
    return 0, seq, 0, "the model"


def _fmt_split(split) -> str:
    return split.strip() if isinstance(split, str) else ",".join(str(c) for c in split)


def _validate_split(split, K: int | None, n: int, model: str) -> list[int]:
    raw = split
    counts = parse_split(split) if isinstance(split, str) else list(split)
    label = f"split {_fmt_split(raw)}"
    for c in counts:
        if not isinstance(c, int) or isinstance(c, bool):
            raise ConfigError(
                f"{label}: {c!r} is not an integer; give whole numbers of blocks per stage"
            )
    if K is not None and len(counts) != K:
        raise ConfigError(
            f"{label}: {len(counts)} counts given for K={K} stages; give exactly {K} counts "
            f"(one per stage) that sum to {n}"
        )
    _validate_K(len(counts), n, model)  # more stages than blocks: say that, not "wrong sum"
    bad = [c for c in counts if c < 1]
    if bad:
        raise ConfigError(
            f"{label}: every stage needs at least one block but {bad[0]} was given; "
            f"give positive counts that sum to {n}"
        )
    if sum(counts) != n:
        raise ConfigError(
            f"{label}: counts sum to {sum(counts)} but {model} has {n} blocks; "
            f"give {len(counts)} counts that sum to {n}"
        )
    return counts


def _validate_K(K, n: int, model: str) -> int:
    if not isinstance(K, int) or isinstance(K, bool):
        raise ConfigError(f"number of stages K must be an integer >= 1, got {K!r}")
    if K < 1:
        raise ConfigError(f"number of stages K={K} is less than 1; use K >= 1 (K=1 is serial)")
    if K > n:
        raise ConfigError(
            f"K={K} stages but {model} has only {n} blocks and every stage needs at least one; "
            f"use K <= {n} or a deeper model"
        )
    return K


def partition_counts(
    costs_or_net, K: int | None = None, split: Sequence[int] | str | None = None
) -> list[int]:
    """Blocks per stage for K contiguous, non-empty stages.

    Args:
        costs_or_net: a :class:`StagedNet` (its measured costs are used), a tuple
            ``(stem_cost, [block_costs], head_cost)`` or a flat list of block costs.
        K: number of stages; may be None only when ``split`` is given (then K = len(split)).
        split: explicit blocks per stage (list of ints or text "4,4,4"); validated and
            returned as is.

    Default (no split): stage 0 carries the stem's cost and stage K-1 the head's; the counts
    minimize the maximum stage cost exactly (the slowest stage bounds a pipeline's step time).
    Many partitions often share that optimum (e.g. when one stage is forced to be heavy), so
    among them we take the one with the smallest sum of squared stage costs (the most even
    rest) and, on remaining ties, the earliest cuts. Both passes are exact dynamic programs,
    O(K * N^2) for N blocks.
    """
    stem, blocks, head, model = _resolve_costs(costs_or_net)
    n = len(blocks)
    if split is not None:
        if K is not None:
            _validate_K(K, n, model)
        return _validate_split(split, K, n, model)
    if K is None:
        raise ConfigError("give the number of stages K or an explicit split such as '3,3,3'")
    K = _validate_K(K, n, model)

    # Stage 0 always contains block 0 and stage K-1 block N-1, so fold stem and head into them.
    w = list(blocks)
    w[0] = w[0] + stem
    w[-1] = w[-1] + head
    prefix = [0]
    for c in w:
        prefix.append(prefix[-1] + c)

    def seg(j: int, i: int):
        return prefix[i] - prefix[j]

    inf = math.inf
    # Pass 1: best[k][i] = smallest possible max stage cost for the first i blocks in k stages.
    best = [[inf] * (n + 1) for _ in range(K + 1)]
    best[0][0] = 0
    for k in range(1, K + 1):
        for i in range(k, n - (K - k) + 1):
            best[k][i] = min(max(best[k - 1][j], seg(j, i)) for j in range(k - 1, i))
    limit = best[K][n]

    # Pass 2: among partitions whose stages all cost <= limit, minimize the sum of squares.
    sq = [[inf] * (n + 1) for _ in range(K + 1)]
    arg = [[-1] * (n + 1) for _ in range(K + 1)]
    sq[0][0] = 0
    for k in range(1, K + 1):
        for i in range(k, n - (K - k) + 1):
            for j in range(k - 1, i):
                c = seg(j, i)
                if c > limit or sq[k - 1][j] == inf:
                    continue
                v = sq[k - 1][j] + c * c
                if v < sq[k][i]:
                    sq[k][i], arg[k][i] = v, j
    counts = []
    i = n
    for k in range(K, 0, -1):
        j = arg[k][i]
        counts.append(i - j)
        i = j
    counts.reverse()
    return counts


def describe_partition(
    net: StagedNet, K: int | None, split: Sequence[int] | str | None = None
) -> list[dict]:
    """Per-stage summary for ``auxpar plan``.

    Each dict: ``index``, ``blocks`` (count of units), ``block_range`` ([start, stop) in units),
    ``units`` (their names, e.g. "0-3a" when block 3 is cut: :meth:`StagedNet.unit_names`), ``params``
    (int), ``flops`` (forward FLOPs per sample, stem/head included), ``out_shape`` (list),
    ``boundary_bytes_per_sample`` (fp32 bytes of the stage's output, i.e. of one sample's aux
    state at the next boundary; None for the last stage).
    """
    if K is None and split is None:
        raise ConfigError("give the number of stages K or an explicit split such as '3,3,3'")
    stages = net.partition(K if K is not None else len(_split_list(split)), split)
    stem_f, block_f, head_f = net.costs()
    names = net.unit_names()
    rows = []
    for st in stages:
        start, stop = st.block_range
        flops = sum(block_f[start:stop])
        flops += stem_f if st.is_first else 0
        flops += head_f if st.is_last else 0
        rows.append(
            {
                "index": st.index,
                "blocks": stop - start,
                "block_range": (start, stop),
                "units": f"{names[start]}-{names[stop - 1]}" if stop - start > 1 else names[start],
                "params": count_parameters(st),
                "flops": int(flops),
                "out_shape": list(st.out_shape),
                "boundary_bytes_per_sample": None
                if st.is_last
                else 4 * math.prod(st.out_shape),
            }
        )
    return rows


def _split_list(split) -> list[int]:
    return parse_split(split) if isinstance(split, str) else list(split)
