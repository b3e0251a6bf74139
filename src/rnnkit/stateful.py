r"""Carry a recurrent module's state across calls: streaming and truncated BPTT.

[`Stateful`][rnnkit.Stateful] wraps an rnnkit layer or cell. Each call continues from the state the
previous call ended in, so feeding a sequence in chunks gives exactly what one call on the whole
sequence gives: the chunk outputs concatenate to the whole output and the carried state ends at the
whole call's final state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnkit import _checks
from rnnkit.cells import _CellBase
from rnnkit.layers import RecurrentLayer
from rnnkit.ops.cpu import stream
from rnnkit.ops.spec import as_states, from_states

State = Tensor | tuple[Tensor, Tensor]


class Stateful(nn.Module):
    r"""Wrap an rnnkit layer or cell so that its state carries over from one call to the next.

    `y = s(x)` runs the module from `s.state` and keeps the state it ends in:

    - for a layer ([`RNN`][rnnkit.RNN], [`GRU`][rnnkit.GRU], [`LSTM`][rnnkit.LSTM]), `x` is a
      chunk of time steps in the layer's own layout (`batch_first`, unbatched and
      PackedSequence input all work) and `y` is the layer's output for that chunk;
    - for a cell ([`RNNCell`][rnnkit.RNNCell], [`GRUCell`][rnnkit.GRUCell],
      [`LSTMCell`][rnnkit.LSTMCell]), `x` is one step `(N, H_in)` or `(H_in)` and `y` is the new
      hidden state `h'`. An LSTM cell returns `h'` only and keeps `(h', c')` in `s.state`.

    `s.state` is what the module would take as `hx`: `h` of shape `(num_layers, N, H_out)`
    for a layer (`(N, H)` for a cell, no `N` for unbatched input), or the pair `(h, c)` for
    LSTM. It is `None` after construction and after [`reset`][rnnkit.Stateful.reset], which means
    "the module's initial state": its learnable `initial_h`/`initial_c` if it has them, else zeros,
    broadcast to the batch size of the next call. You may also assign a state yourself.
    `.to()`, `.double()`, `.cuda()` and the like convert the carried state along with the
    parameters.

    Dropout masks: a module with `recurrent_dropout` or `input_dropout` uses one mask per
    sequence, so in training `Stateful` draws them (`module.sequence_masks`) at the first call
    after construction or [`reset`][rnnkit.Stateful.reset] and reuses them for every chunk until the
    next reset (`reset(rows)` redraws those rows' masks only): chunked training equals one call on
    the whole sequence with the same masks. Zoneout masks are fresh at every step anyway.

    Args:
        module: an rnnkit layer or cell. A bidirectional layer cannot stream (its backward
            direction needs the end of the sequence first) and is refused.
        detach: `True` (default) stops gradients at call boundaries (truncated BPTT): the
            carried state is detached after each call, so `backward()` on one chunk's loss
            never reaches earlier chunks. `False` keeps the graph across calls, so gradients
            flow back through every call since the last [`reset`][rnnkit.Stateful.reset]; the graph
            then grows with each call until you reset.

    Lengths:
        `lengths` (1-D, one entry per sequence) gives the number of valid steps of each
        sequence in this call; `0` means the sequence has ended (or not started) and is
        left untouched: its state is kept and its output is zero. For a cell each entry is
        `0` or `1`. To stream sequences of total lengths `L` in chunks of `T` steps,
        pass `(L - offset).clamp(0, T)` for the chunk starting at `offset`.

    Raises:
        TypeError: `module` is not an rnnkit layer or cell.
        ValueError: `module` is bidirectional; a call's batch size (or batched/unbatched
            form) differs from the carried state's (call [`reset`][rnnkit.Stateful.reset] first);
            bad lengths.
    """

    def __init__(self, module: nn.Module, *, detach: bool = True) -> None:
        super().__init__()
        if not isinstance(module, (RecurrentLayer, _CellBase)):
            hint = ""
            if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
                hint = "; convert a torch.nn module with rnnkit.interop.from_torch first"
            raise TypeError(
                "Stateful wraps an rnnkit layer or cell (RNN, GRU, LSTM, RNNCell, GRUCell, "
                f"LSTMCell), got {type(module).__name__}{hint}"
            )
        if isinstance(module, RecurrentLayer) and module.bidirectional:
            raise ValueError(
                "a bidirectional layer cannot stream: its reverse direction starts from the "
                "end of the whole sequence, which a chunk does not have; wrap a "
                "unidirectional layer (bidirectional=False)"
            )
        _checks.boolean("detach", detach)
        self.module = module
        self.detach = detach
        self.state: State | None = None
        self.masks: dict[str, Tensor] | None = None  # the per-sequence dropout masks

    @property
    def _is_cell(self) -> bool:
        return isinstance(self.module, _CellBase)

    def reset(self, rows: Tensor | Sequence[int] | None = None) -> None:
        """Go back to the module's initial state (learnable if it has one, else zeros).

        Args:
            rows: `None` resets every sequence (the next call may then change the batch
                size); else only these rows of the carried batch, given as a boolean mask of
                shape `(N,)` or as indices, for actors that step many environments at once.

        Raises:
            TypeError, ValueError: `rows` is not a boolean mask of the batch size or valid
                indices, or the carried state is unbatched.
        """
        if rows is None:
            self.state = None
            self.masks = None
            return
        self._redraw_masks(rows)
        carried = self._carried()
        if carried is None:
            return  # every row is at the initial state already
        batch = self._batch_of(carried)
        if batch is None:
            raise ValueError("reset(rows) needs a batched carried state; use reset() instead")
        mask = _checks.rows(rows, batch, carried[0].device)
        fresh = self._initial_state(batch)
        shape = (-1, 1) if self._is_cell else (1, -1, 1)
        kept = mask.view(shape)
        self._store(tuple(torch.where(kept, new, old) for new, old in zip(fresh, carried)))

    def _redraw_masks(self, rows) -> None:
        """Fresh per-sequence dropout masks for the reset rows; the others keep theirs."""
        if not self.masks:
            return
        batch = next(iter(self.masks.values())).shape[0]
        mask = _checks.rows(rows, batch, next(iter(self.masks.values())).device)
        fresh = self.module.sequence_masks(batch)
        self.masks = {key: torch.where(mask.view(-1, 1), fresh[key], old)
                      for key, old in self.masks.items()}

    def _dropout_masks(self, batch: int | None) -> dict[str, Tensor] | None:
        """The masks of this call: drawn at the first training call after a reset, then kept
        (a different batch size needs a reset first, which the state check enforces)."""
        module = self.module
        if not module.training or not (module.recurrent_dropout or module.input_dropout):
            return None
        rows = 1 if batch is None else batch
        if self.masks is None or next(iter(self.masks.values())).shape[0] != rows:
            self.masks = module.sequence_masks(rows)
        return self.masks

    def _apply(self, fn, recurse=True):
        # .to(), .double(), .cuda() and the like convert the carried state with the
        # parameters, so a stream goes on where the module now lives.
        super()._apply(fn, recurse)
        carried = self._carried()
        if carried is not None:
            self.state = from_states(tuple(fn(s) for s in carried))
        if self.masks:
            self.masks = {key: fn(mask) for key, mask in self.masks.items()}
        return self

    # state helpers ------------------------------------------------------------------------

    def _carried(self) -> tuple[Tensor, ...] | None:
        return None if self.state is None else as_states(self.state)

    def _store(self, state: tuple[Tensor, ...]) -> None:
        if self.detach:
            state = tuple(s.detach() for s in state)
        self.state = from_states(state)

    def _batch_of(self, state: tuple[Tensor, ...]) -> int | None:
        """The batch size a carried state was made for; `None` for unbatched."""
        hidden = state[0]
        batched_rank = 2 if self._is_cell else 3
        if hidden.dim() != batched_rank:
            return None
        return hidden.shape[0] if self._is_cell else hidden.shape[1]

    def _check_batch(self, state: tuple[Tensor, ...], batch: int | None) -> None:
        carried = self._batch_of(state)
        if carried == batch:
            return

        def describe(size: int | None) -> str:
            return "unbatched input" if size is None else f"a batch of {size}"

        raise ValueError(
            f"the carried state was made for {describe(carried)} but this call has "
            f"{describe(batch)}; call reset() before feeding a different batch"
        )

    def _initial_state(self, batch: int | None) -> tuple[Tensor, ...]:
        """The module's initial state, broadcast to `batch` (`None`: unbatched)."""
        return self.module.initial_state(batch)

    # forward ------------------------------------------------------------------------------

    def forward(
        self, input: Tensor | PackedSequence, lengths=None, *, resets: Tensor | None = None
    ) -> Tensor | PackedSequence:
        """Run the module on `input` from the carried state and keep the state it ends in.

        Args:
            input: for a layer, `(L, N, H_in)`, `(N, L, H_in)` with `batch_first`,
                `(L, H_in)` unbatched, or a PackedSequence; for a cell, `(N, H_in)` or
                `(H_in)`.
            lengths: optional valid steps per sequence in this call, `0` allowed (see the
                class docstring); not allowed with a PackedSequence.
            resets: optional boolean tensor, true where a sequence starts afresh (an episode
                start) from the module's initial state: for a layer `(L, N)` (`(N, L)`
                with `batch_first`, `(L,)` unbatched), with the layer's own rule (see
                [`rnnkit.GRU.forward`][]); for a cell `(N,)` (a 0-d tensor unbatched),
                applied before the step. The carried state is the one after the last step.

        Returns:
            A layer's output for this chunk (`(L, N, H_out)` in the input's layout), or a
                cell's new hidden state `h'`. Entries with length `0` are zero.
        """
        if lengths is None and resets is None:
            # One step without gradients runs compiled from packed weights (ops/cpu/stream.py),
            # with as little Python around it as the checks allow.
            module = self._modules["module"]
            step = stream.cell_step if isinstance(module, _CellBase) else stream.layer_step
            fast = step(module, input, self.state)
            if fast is not None:
                final = fast[1]
                self.__dict__["state"] = final[0] if len(final) == 1 else final  # from_states
                return fast[0]
        if self._is_cell:
            return self._forward_cell(input, lengths, resets)
        return self._forward_layer(input, lengths, resets)

    def _forward_layer(self, input, lengths, resets) -> Tensor | PackedSequence:
        module = self.module
        reference = module.weight_ih_l0
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("lengths must not be given with a PackedSequence input")
            batch, batched, seq_len = int(input.batch_sizes[0]), True, None
        else:
            _checks.input_tensor(input, reference, module.input_size, (2, 3), "input")
            batched = input.dim() == 3
            batch_dim = (0 if module.batch_first else 1) if batched else None
            time_dim = (1 if module.batch_first else 0) if batched else 0
            batch = input.shape[batch_dim] if batched else None
            seq_len = input.shape[time_dim]
        carried = self._carried()
        if carried is not None:
            self._check_batch(carried, batch)
        state = carried if carried is not None else self._initial_state(batch)
        hx = from_states(state)

        masks = self._dropout_masks(batch)
        if lengths is None:
            output, final = module(input, hx, resets=resets, dropout_masks=masks)
            self._store(as_states(final))
            return output

        lengths = _checks.lengths(lengths, batch or 1, seq_len, input.device, minimum=0)
        active = lengths > 0
        if not bool(active.any()):
            # Nothing advances; keep the state exactly as it was (possibly still None).
            out_size = module.proj_size or module.hidden_size
            return input.new_zeros((*input.shape[:-1], out_size))
        output, final = module(input, hx, lengths=lengths.clamp(min=1), resets=resets,
                               dropout_masks=masks)
        final = as_states(final)
        if not bool(active.all()):
            # Sequences with no step here ran one throw-away step; undo it.
            keep = active.view(1, -1, 1)
            final = tuple(torch.where(keep, new, old) for new, old in zip(final, state))
            shape = [1, 1, 1]
            shape[batch_dim] = -1
            output = torch.where(active.view(shape), output, torch.zeros_like(output))
        self._store(final)
        return output

    def _forward_cell(self, input, lengths, resets) -> Tensor:
        module = self.module
        _checks.input_tensor(input, module.weight_ih, module.input_size, (1, 2), "input")
        batch = input.shape[0] if input.dim() == 2 else None
        carried = self._carried()
        if carried is not None:
            self._check_batch(carried, batch)
        state = carried if carried is not None else self._initial_state(batch)
        if resets is not None:
            fresh = _checks.rows(resets, batch, input.device, what="resets")
            keep = fresh.view(-1, 1) if batch is not None else fresh
            initial = self._initial_state(batch)
            state = tuple(torch.where(keep, new, old) for new, old in zip(initial, state))

        active = None
        if lengths is not None:
            active = _checks.lengths(lengths, batch or 1, 1, input.device, minimum=0) > 0
            if not bool(active.any()):
                return input.new_zeros((*input.shape[:-1], module.hidden_size))
            if bool(active.all()):
                active = None
        masks = self._dropout_masks(batch)
        if module.spec.num_states == 2:
            final = module(input, state, dropout_masks=masks)
        else:
            final = (module(input, state[0], dropout_masks=masks),)
        hidden = final[0]
        if active is not None:
            keep = active.view(-1, 1) if batch is not None else active
            final = tuple(torch.where(keep, new, old) for new, old in zip(final, state))
            hidden = torch.where(keep, hidden, torch.zeros_like(hidden))
        self._store(final)
        return hidden

    def extra_repr(self) -> str:
        return "" if self.detach else "detach=False"
