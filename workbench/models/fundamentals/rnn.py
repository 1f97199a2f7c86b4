"""Recurrent networks from scratch: the Elman RNN, the LSTM, and sequence models built on them.

What it is
    `RNNCell` and `LSTMCell` compute one time step; `RNN` and `LSTM` stack cells into layers and run them
    over a sequence, with the same constructor arguments, parameter layout, inputs and outputs as
    `torch.nn.RNN` / `torch.nn.LSTM` (so `from_torch` copies a torch module's weights and the results agree:
    tested on outputs, final states and gradients). `SequenceModel` puts an embedding (or real-valued
    inputs) in front and a linear head behind: a classifier reads the last state or the mean output, a
    regressor reads every step.

The math (one layer; x_t (B, I), h_t and c_t (B, H))
    Elman RNN (Elman 1990), phi = tanh or relu:
        h_t = phi(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
    LSTM (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000); W_ih is (4H, I) and
    W_hh (4H, H), their row blocks being the gates in the order i, f, g, o as in torch:
        [a_i; a_f; a_g; a_o] = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh
        i = sigmoid(a_i)   f = sigmoid(a_f)   g = tanh(a_g)   o = sigmoid(a_o)
        c_t = f * c_{t-1} + i * g
        h_t = o * tanh(c_t)
    Layer l > 0 reads the h_t of layer l - 1 (with dropout between layers while training). The output of
    the stack is the top layer's h_t at every step; the final states are every layer's h_T (and c_T).

Backpropagation through time (BPTT)
    Unrolled over T steps an RNN is a T-layer feed-forward network whose layers share weights, and autograd
    differentiates the unrolled graph. A loss at step T reaches h_t through a product of step Jacobians:
        dh_T/dh_t = prod_{s=t+1..T} dh_s/dh_{s-1},    dh_s/dh_{s-1} = diag(phi'(a_s)) W_hh
    For tanh |phi'| <= 1, so the norm of that product is at most ||W_hh||^(T - t): when the largest
    singular value of W_hh is below 1 the gradient shrinks geometrically with the distance T - t
    (vanishing), and when the Jacobians are larger than 1 it can grow the same way (exploding; gradient
    clipping, `train.grad_clip`, caps the step). Either way an Elman RNN finds it hard to learn how an
    input influences a loss many steps later (Bengio, Simard & Frasconi 1994; Pascanu, Mikolov & Bengio
    2013). The sequence task measures this decay for both cells (docs/rnn.md).

Why the LSTM's additive cell path helps
    The cell state is updated by addition, c_t = f * c_{t-1} + i * g, so along the cell path
        dc_t/dc_{t-1} = diag(f_t)        (plus the paths through h_{t-1} into the gates)
    a diagonal of gate values rather than a product with W_hh and squashing derivatives. When the network
    keeps f near 1 the error flows back unchanged over many steps (the "constant error carousel"), and
    because f is computed from the input, the network learns *when* to keep and when to forget.

The forget-gate bias
    With all biases near 0 the forget gate starts at sigmoid(0) = 1/2, so at initialization the cell path
    halves the signal every step and the long-range gradient vanishes before the gate has learned anything.
    Adding `forget_bias` (1 by default, the choice of Gers et al. 2000 and Jozefowicz et al. 2015) to the
    forget rows of b_ih starts f near sigmoid(1), so the cell remembers by default.

Design choices
    Parameters are named and laid out as in torch (`weight_ih`, `weight_hh`, `bias_ih`, `bias_hh` per
    cell, gates stacked in rows); the stack keeps its cells in `layers`, so torch's `weight_ih_l{k}` is our
    `layers.{k}.weight_ih` (`load_torch_weights`).
    The input-to-hidden product does not depend on the previous state, so a layer computes it for all steps
    in one matmul before the time loop (as cuDNN does); only W_hh h_{t-1} is sequential.
    Variable-length batches: `lengths` (B,) freezes each sequence's state after its last real step and
    zeroes the outputs there, which is what torch's pack_padded_sequence / pad_packed_sequence give
    (tested), so a padded batch reads the same final states as each sequence run alone.
    `__init__` allocates with torch.empty (nothing under torch.device("meta")); `init_weights()` is the
    only initializer.

Differences from torch
    Initialization: every parameter ~ U(-1/sqrt(H), 1/sqrt(H)) as in torch, then the LSTM adds
    `forget_bias` to the forget rows of b_ih (`forget_bias = 0` is torch's initialization exactly).
    Not implemented: bidirectional layers and LSTM projections (`proj_size`); `from_torch` refuses them.
    The time loop is Python, one small matmul per step, so it is far slower than torch's fused kernels;
    it is meant to be read.

Sources
    J. Elman, "Finding Structure in Time", Cognitive Science 1990; S. Hochreiter & J. Schmidhuber, "Long
    Short-Term Memory", Neural Computation 1997; F. Gers, J. Schmidhuber & F. Cummins, "Learning to Forget",
    Neural Computation 2000; Y. Bengio, P. Simard & P. Frasconi, "Learning Long-Term Dependencies with
    Gradient Descent is Difficult", IEEE TNN 1994; R. Pascanu, T. Mikolov & Y. Bengio, "On the difficulty of
    training recurrent neural networks", ICML 2013; R. Jozefowicz, W. Zaremba & I. Sutskever, "An Empirical
    Exploration of Recurrent Network Architectures", ICML 2015; the torch.nn.RNN / torch.nn.LSTM
    documentation (parameter layout; read, not copied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from workbench.config import field_

__all__ = ["RNNCell", "LSTMCell", "RNN", "LSTM", "Config", "FLAVORS", "SequenceModel", "load_torch_weights"]


# ----------------------------------------------------------------------------------------------------
# Cells: one time step


class _Cell(nn.Module):
    """Shared by both cells: `gates` row blocks of H in weight_ih (gates*H, I) and weight_hh (gates*H, H)."""

    gates = 1

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if input_size <= 0 or hidden_size <= 0:
            raise ValueError(f"input_size and hidden_size must be > 0, got {input_size} and {hidden_size}")
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        kw = {"device": device, "dtype": dtype}
        rows = self.gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(rows, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(rows, hidden_size, **kw))
        self.bias_ih = nn.Parameter(torch.empty(rows, **kw)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(rows, **kw)) if bias else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """torch's initialization: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))."""
        k = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -k, k)

    def project(self, x: Tensor) -> Tensor:
        """The input half of the pre-activation, W_ih x + b_ih + b_hh, for any leading shape (..., I)."""
        # (..., I) -> (..., gates*H)
        out = x @ self.weight_ih.T
        if self.bias_ih is not None:
            out = out + (self.bias_ih + self.bias_hh)
        return out

    def _zeros(self, x: Tensor) -> Tensor:
        return x.new_zeros(*x.shape[:-1], self.hidden_size)


class RNNCell(_Cell):
    """One Elman step, h' = phi(W_ih x + b_ih + W_hh h + b_hh), phi = tanh or relu (torch.nn.RNNCell)."""

    gates = 1

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: Literal["tanh", "relu"] = "tanh", device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, device, dtype)

    def recur(self, xw: Tensor, h: Tensor) -> Tensor:
        """The step from the projected input xw = W_ih x + b (B, H) and the previous state h (B, H)."""
        # a = W_ih x + b_ih + W_hh h + b_hh
        a = xw + h @ self.weight_hh.T
        # h' = phi(a)
        return torch.tanh(a) if self.nonlinearity == "tanh" else torch.relu(a)

    def forward(self, x: Tensor, h: Tensor | None = None) -> Tensor:
        """x (B, I) or (I,), h (B, H) or (H,) (zeros if None) -> h' of h's shape."""
        return self.recur(self.project(x), self._zeros(x) if h is None else h)


class LSTMCell(_Cell):
    """One LSTM step with gates in torch's order i, f, g, o (torch.nn.LSTMCell); state is (h, c)."""

    gates = 4

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, forget_bias: float = 1.0,
                 device=None, dtype=None):
        self.forget_bias = forget_bias
        super().__init__(input_size, hidden_size, bias, device, dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        """torch's U(-1/sqrt(H), 1/sqrt(H)) everywhere, then b_ih[H:2H] (the forget rows) += forget_bias."""
        super().init_weights()
        if self.bias_ih is not None:
            H = self.hidden_size
            self.bias_ih[H:2 * H] += self.forget_bias

    def recur(self, xw: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """The step from the projected input xw (B, 4H) and the previous (h, c), each (B, H)."""
        h, c = state
        # [a_i; a_f; a_g; a_o] = W_ih x + b_ih + W_hh h + b_hh     (B, 4H) -> four (B, H)
        a_i, a_f, a_g, a_o = (xw + h @ self.weight_hh.T).chunk(4, dim=-1)
        # i = sigmoid(a_i), f = sigmoid(a_f), g = tanh(a_g), o = sigmoid(a_o)
        i, f, g, o = torch.sigmoid(a_i), torch.sigmoid(a_f), torch.tanh(a_g), torch.sigmoid(a_o)
        # c' = f * c + i * g
        c = f * c + i * g
        # h' = o * tanh(c')
        return o * torch.tanh(c), c

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """x (B, I) or (I,), state (h, c) each (B, H) or (H,) (zeros if None) -> (h', c')."""
        if state is None:
            state = (self._zeros(x), self._zeros(x))
        return self.recur(self.project(x), state)


# ----------------------------------------------------------------------------------------------------
# Stacks: many layers over a sequence


class _Stack(nn.Module):
    """Layers of cells run over a sequence; `RNN` and `LSTM` differ only in the cell and the state type."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, bias: bool, batch_first: bool,
                 dropout: float, make_cell):
        super().__init__()
        if num_layers <= 0:
            raise ValueError(f"num_layers must be > 0, got {num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, dropout
        self.layers = nn.ModuleList(make_cell(input_size if k == 0 else hidden_size) for k in range(num_layers))

    def init_weights(self) -> None:
        for cell in self.layers:
            cell.init_weights()

    def _run(self, x: Tensor, states: list, lengths: Tensor | None) -> tuple[Tensor, list]:
        """x (T, B, I) time-major, states[k] = layer k's initial state -> top outputs (T, B, H), final states."""
        T = x.shape[0]
        keep = None
        if lengths is not None:
            # keep[t, b] = step t is a real step of sequence b (t < lengths[b])      (T, B, 1)
            keep = (torch.arange(T, device=x.device)[:, None] < lengths.to(x.device)[None, :])[..., None]
        finals = []
        for k, cell in enumerate(self.layers):
            if k > 0 and self.dropout > 0:
                x = nn.functional.dropout(x, self.dropout, self.training)
            # the input half of every step in one matmul: (T, B, I) -> (T, B, gates*H)
            xw = cell.project(x)
            state, outs = states[k], []
            for t in range(T):
                new = cell.recur(xw[t], state)
                if keep is not None:
                    # past a sequence's end its state stays as it was (pack_padded_sequence semantics)
                    new = _where(keep[t], new, state)
                state = new
                outs.append(_hidden(state))
            x = torch.stack(outs)  # T x (B, H) -> (T, B, H)
            if keep is not None:
                x = x * keep  # outputs past a sequence's end are 0, as pad_packed_sequence gives
            finals.append(state)
        return x, finals

    def _prepare(self, x: Tensor, lengths: Tensor | None) -> tuple[Tensor, bool]:
        """Any accepted input layout -> time-major (T, B, I), and whether the input was unbatched."""
        if x.dim() not in (2, 3):
            raise ValueError(f"expected input of shape (T, I), (T, B, I) or (B, T, I), got {tuple(x.shape)}")
        if x.shape[-1] != self.input_size:
            raise ValueError(f"expected input_size {self.input_size} features, got input of shape {tuple(x.shape)}")
        unbatched = x.dim() == 2
        if unbatched:
            if lengths is not None:
                raise ValueError("lengths needs a batched input")
            return x[:, None], True  # (T, I) -> (T, 1, I)
        return (x.transpose(0, 1) if self.batch_first else x), False  # (B, T, I) -> (T, B, I)

    def _finish(self, out: Tensor, unbatched: bool) -> Tensor:
        if unbatched:
            return out[:, 0]  # (T, 1, H) -> (T, H)
        return out.transpose(0, 1) if self.batch_first else out  # (T, B, H) -> (B, T, H)

    def _initial(self, h0: Tensor | None, x: Tensor, unbatched: bool) -> list[Tensor]:
        """Per-layer (B, H) initial states from h0 of shape (L, B, H) ((L, H) unbatched; zeros if None)."""
        L, B, H = self.num_layers, x.shape[1], self.hidden_size
        if h0 is None:
            return [x.new_zeros(B, H) for _ in range(L)]
        h0 = h0[:, None] if unbatched else h0  # (L, H) -> (L, 1, H)
        if tuple(h0.shape) != (L, B, H):
            raise ValueError(f"expected an initial state of shape {(L, B, H)}, got {tuple(h0.shape)}")
        return list(h0.unbind(0))  # (L, B, H) -> L x (B, H)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, bias={self.bias}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}")


def _hidden(state):
    return state[0] if isinstance(state, tuple) else state


def _where(keep: Tensor, new, old):
    if isinstance(new, tuple):
        return tuple(torch.where(keep, n, o) for n, o in zip(new, old))
    return torch.where(keep, new, old)


class RNN(_Stack):
    """Multi-layer Elman RNN with torch.nn.RNN's interface.

    forward(x, h0=None, lengths=None) -> (output, h_n)
        x       (T, B, I), or (B, T, I) with batch_first, or (T, I) unbatched
        h0      (L, B, H) or (L, H); zeros if None
        lengths (B,) real steps per sequence of a right-padded batch, or None (all T)
        output  the top layer's h_t at every step: (T, B, H) / (B, T, H) / (T, H)
        h_n     every layer's final state, the shape of h0
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: Literal["tanh", "relu"] = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, device=None, dtype=None):
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         lambda i: RNNCell(i, hidden_size, bias, nonlinearity, device, dtype))

    def forward(self, x: Tensor, h0: Tensor | None = None, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, unbatched = self._prepare(x, lengths)
        out, finals = self._run(x, self._initial(h0, x, unbatched), lengths)
        h_n = torch.stack(finals)  # L x (B, H) -> (L, B, H)
        return self._finish(out, unbatched), (h_n[:, 0] if unbatched else h_n)

    @classmethod
    def from_torch(cls, module: nn.RNN) -> RNN:
        """A copy of a torch.nn.RNN: same sizes, same weights (on the module's device and dtype)."""
        _check_torch(module)
        p = module.weight_ih_l0
        ours = cls(module.input_size, module.hidden_size, module.num_layers, module.nonlinearity, module.bias,
                   module.batch_first, module.dropout, device=p.device, dtype=p.dtype)
        load_torch_weights(ours, module)
        return ours


class LSTM(_Stack):
    """Multi-layer LSTM with torch.nn.LSTM's interface.

    forward(x, state=None, lengths=None) -> (output, (h_n, c_n))
        x       (T, B, I), or (B, T, I) with batch_first, or (T, I) unbatched
        state   (h0, c0), each (L, B, H) or (L, H); zeros if None
        lengths (B,) real steps per sequence of a right-padded batch, or None (all T)
        output  the top layer's h_t at every step: (T, B, H) / (B, T, H) / (T, H)
        h_n, c_n every layer's final hidden and cell states, the shape of h0
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, forget_bias: float = 1.0, device=None,
                 dtype=None):
        self.forget_bias = forget_bias
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         lambda i: LSTMCell(i, hidden_size, bias, forget_bias, device, dtype))

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None,
                lengths: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x, unbatched = self._prepare(x, lengths)
        h0, c0 = (None, None) if state is None else state
        init = list(zip(self._initial(h0, x, unbatched), self._initial(c0, x, unbatched)))
        out, finals = self._run(x, init, lengths)
        # L x (B, H) -> (L, B, H), for h and for c
        h_n, c_n = torch.stack([h for h, _ in finals]), torch.stack([c for _, c in finals])
        if unbatched:
            h_n, c_n = h_n[:, 0], c_n[:, 0]
        return self._finish(out, unbatched), (h_n, c_n)

    @classmethod
    def from_torch(cls, module: nn.LSTM) -> LSTM:
        """A copy of a torch.nn.LSTM: same sizes, same weights (on the module's device and dtype)."""
        _check_torch(module)
        p = module.weight_ih_l0
        ours = cls(module.input_size, module.hidden_size, module.num_layers, module.bias, module.batch_first,
                   module.dropout, forget_bias=0.0, device=p.device, dtype=p.dtype)
        load_torch_weights(ours, module)
        return ours


def _check_torch(module: nn.RNNBase) -> None:
    if module.bidirectional:
        raise ValueError("bidirectional RNNs are not implemented here")
    if getattr(module, "proj_size", 0):
        raise ValueError(f"LSTM projections (proj_size={module.proj_size}) are not implemented here")


@torch.no_grad()
def load_torch_weights(ours: RNN | LSTM, module: nn.RNNBase) -> None:
    """Copy a torch.nn.RNN / torch.nn.LSTM's parameters into ours: `weight_ih_l{k}` -> `layers.{k}.weight_ih`."""
    kind = {RNN: "RNN_" + getattr(ours, "nonlinearity", "").upper(), LSTM: "LSTM"}[type(ours)]
    if module.mode != kind:
        raise ValueError(f"cannot load a torch {module.mode} into a {kind}")
    _check_torch(module)
    sizes = ("input_size", "hidden_size", "num_layers", "bias")
    if any(getattr(module, s) != getattr(ours, s) for s in sizes):
        raise ValueError("sizes differ: torch has " + ", ".join(f"{s}={getattr(module, s)}" for s in sizes)
                         + "; ours has " + ", ".join(f"{s}={getattr(ours, s)}" for s in sizes))
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if ours.bias else [])
    for k, cell in enumerate(ours.layers):
        for name in names:
            getattr(cell, name).copy_(getattr(module, f"{name}_l{k}"))


# ----------------------------------------------------------------------------------------------------
# Sequence models: (embedding ->) RNN/LSTM -> linear head


@dataclass
class Config:
    """The architecture; the sizes that come from the data (vocabulary, features, outputs) are arguments."""

    cell: Literal["rnn", "lstm"] = field_("lstm", doc="the recurrent cell")
    nonlinearity: Literal["tanh", "relu"] = field_("tanh", doc="the Elman cell's phi (cell = 'rnn' only)")
    embed_dim: int = field_(32, gt=0, doc="token embedding width (token inputs only)")
    hidden_size: int = field_(64, gt=0)
    num_layers: int = field_(1, gt=0)
    dropout: float = field_(0.0, ge=0, lt=1, doc="between stacked layers and before the head, while training")
    readout: Literal["last", "mean", "steps"] = field_(
        "last", doc="last: the top layer's final state; mean: the mean output over real steps (both one "
                    "prediction per sequence); steps: a prediction at every step")
    forget_bias: float = field_(1.0, doc="added to the LSTM forget-gate bias at initialization")


FLAVORS: dict[str, Config] = {
    "debug": Config(embed_dim=8, hidden_size=16),
    "small": Config(embed_dim=32, hidden_size=64),
}


class SequenceModel(nn.Module):
    """(Embedding ->) RNN or LSTM (batch first) -> dropout -> linear head.

    forward(x, lengths=None)
        x       (B, T) int64 token ids (vocab_size > 0; id 0 is padding) or (B, T, input_size) floats
        lengths (B,) real steps of a right-padded batch, or None
        returns (B, num_outputs) for readout last/mean, (B, T, num_outputs) for readout steps
    """

    def __init__(self, cfg: Config, *, num_outputs: int, vocab_size: int = 0, input_size: int = 0):
        super().__init__()
        if num_outputs <= 0:
            raise ValueError(f"num_outputs must be > 0, got {num_outputs}")
        if (vocab_size > 0) == (input_size > 0):
            raise ValueError(f"give exactly one of vocab_size (token inputs) and input_size (real-valued "
                             f"inputs), got vocab_size={vocab_size}, input_size={input_size}")
        self.cfg = cfg
        self.embed = nn.Embedding(vocab_size, cfg.embed_dim, padding_idx=0) if vocab_size else None
        width = cfg.embed_dim if vocab_size else input_size
        if cfg.cell == "lstm":
            self.rnn = LSTM(width, cfg.hidden_size, cfg.num_layers, batch_first=True, dropout=cfg.dropout,
                            forget_bias=cfg.forget_bias)
        else:
            self.rnn = RNN(width, cfg.hidden_size, cfg.num_layers, cfg.nonlinearity, batch_first=True,
                           dropout=cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden_size, num_outputs)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Embedding N(0, 1) with a zero padding row, the recurrent layers' own init, torch's Linear init."""
        if self.embed is not None:
            self.embed.reset_parameters()
        self.rnn.init_weights()
        self.head.reset_parameters()

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        e = self.embed(x) if self.embed is not None else x  # (B, T) -> (B, T, E), or (B, T, I) as is
        out, state = self.rnn(e, lengths=lengths)  # out (B, T, H); state (L, B, H) or a pair of them
        if self.cfg.readout == "steps":
            return self.head(self.drop(out))  # (B, T, H) -> (B, T, num_outputs)
        if self.cfg.readout == "last":
            feat = _hidden(state)[-1]  # the top layer's final state (at each sequence's own end): (B, H)
        else:
            steps = out.new_full((out.shape[0],), out.shape[1]) if lengths is None else lengths.to(out)
            feat = out.sum(1) / steps[:, None]  # padded outputs are 0: (B, T, H) -> (B, H)
        return self.head(self.drop(feat))  # (B, H) -> (B, num_outputs)
