"""The reference path's recurrent dropout, zoneout, layer norm and gate activations, held
equal to a per-sequence, per-step loop written here from the equations (Gal & Ghahramani
2016; Krueger et al. 2016; Ba et al. 2016 as in haste's LayerNormLSTM/LayerNormGRU). The
loop below calls no rnnkit function: its layer norm is the mean/variance formula, its gates
are sliced by hand, and lengths/direction are handled one sequence at a time.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from rnnkit.ops import dispatch
from rnnkit.ops.spec import Call, CellSpec

EPS = 1e-5
ACTS = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "hard_sigmoid": lambda x: torch.clamp(x / 6 + 0.5, 0.0, 1.0),  # Keras 3's definition
    "softsign": lambda x: x / (1 + x.abs()),
}


def _ln(x, gain, bias):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS) * gain + bias


def _loop(mode, p, x, state, *, reverse=False, lengths=None, reset_after=True):
    """Independent per-step loop over each sequence; `p` holds the weights and options."""
    act, gate = ACTS[p["act"]], ACTS[p["gate"]]
    steps, batch = x.shape[0], x.shape[1]
    hidden_size = p["w_hh"].shape[0] // (4 if mode == "lstm" else 3)
    outputs = torch.zeros(steps, batch, state[0].shape[-1], dtype=x.dtype)
    finals = []
    for b in range(batch):
        h = state[0][b]
        c = state[1][b] if mode == "lstm" else None
        length = steps if lengths is None else int(lengths[b])
        order = range(length - 1, -1, -1) if reverse else range(length)
        drop = p["drop"][b] if p.get("drop") is not None else 1.0
        for t in order:
            xt = x[t, b]
            wx = p["w_ih"] @ xt
            if p.get("ln_ih") is not None:
                wx = _ln(wx, *p["ln_ih"])
            wx = wx + p["b_ih"]
            h_in = h * drop
            wh = p["w_hh"] @ h_in
            if p.get("ln_hh") is not None:
                wh = _ln(wh, *p["ln_hh"])
            wh = wh + p["b_hh"]
            H = hidden_size
            if mode == "lstm":
                i = gate(wx[:H] + wh[:H])
                f = gate(wx[H:2 * H] + wh[H:2 * H])
                g = act(wx[2 * H:3 * H] + wh[2 * H:3 * H])
                o = gate(wx[3 * H:] + wh[3 * H:])
                c_new = f * c + i * g
                shown = _ln(c_new, *p["ln_c"]) if p.get("ln_c") is not None else c_new
                h_new = o * act(shown)
            elif reset_after:
                r = gate(wx[:H] + wh[:H])
                z = gate(wx[H:2 * H] + wh[H:2 * H])
                n = act(wx[2 * H:] + r * wh[2 * H:])
                h_new = (1 - z) * n + z * h
            else:
                r = gate(wx[:H] + wh[:H])
                z = gate(wx[H:2 * H] + wh[H:2 * H])
                n = act(wx[2 * H:] + p["w_hh"][2 * H:] @ (r * h_in) + p["b_hh"][2 * H:])
                h_new = (1 - z) * n + z * h
            zone = p.get("zoneout", 0.0)
            if zone:
                keep_h = p["zh"][t, b] if p.get("zh") is not None else zone
                h_new = keep_h * h + (1 - keep_h) * h_new
                if mode == "lstm":
                    keep_c = p["zc"][t, b] if p.get("zc") is not None else zone
                    c_new = keep_c * c + (1 - keep_c) * c_new
            h = h_new
            c = c_new if mode == "lstm" else None
            outputs[t, b] = h
        finals.append((h, c) if mode == "lstm" else (h,))
    final = tuple(torch.stack([f[i] for f in finals]) for i in range(len(finals[0])))
    return outputs, final


def _setup(mode, *, seed, drop_p=0.0, zone=0.0, train_zone=True, layer_norm=False,
           act="tanh", gate="sigmoid", steps=5, batch=3, features=4, hidden=6):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.5):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale)

    gates = (4 if mode == "lstm" else 3) * hidden
    p = {
        "w_ih": rand(gates, features), "w_hh": rand(gates, hidden),
        "b_ih": rand(gates), "b_hh": rand(gates), "act": act, "gate": gate,
    }
    if drop_p:
        keep = torch.rand(batch, hidden, generator=generator) >= drop_p
        p["drop"] = keep.double() / (1 - drop_p)
    if zone:
        p["zoneout"] = zone
        if train_zone:
            p["zh"] = (torch.rand(steps, batch, hidden, generator=generator) < zone).double()
            if mode == "lstm":
                p["zc"] = (torch.rand(steps, batch, hidden, generator=generator) < zone).double()
    if layer_norm:
        p["ln_ih"] = (1 + rand(gates, scale=0.2), rand(gates, scale=0.2))
        p["ln_hh"] = (1 + rand(gates, scale=0.2), rand(gates, scale=0.2))
        if mode == "lstm":
            p["ln_c"] = (1 + rand(hidden, scale=0.2), rand(hidden, scale=0.2))
    x = rand(steps, batch, features, scale=1.0)
    state = (rand(batch, hidden),) + ((rand(batch, hidden),) if mode == "lstm" else ())
    return p, x, state


def _call(mode, p, x, state, *, reverse=False, lengths=None, reset_after=True):
    spec = CellSpec(mode, nonlinearity=p["act"], recurrent_activation=p["gate"],
                    reset_after=reset_after, zoneout=p.get("zoneout", 0.0),
                    layer_norm=p.get("ln_hh") is not None)
    return Call(
        spec=spec, state=state, weight_hh=p["w_hh"], bias_hh=p["b_hh"], input=x,
        weight_ih=p["w_ih"], bias_ih=p["b_ih"], lengths=lengths, reverse=reverse,
        hidden_dropout=p.get("drop"), zoneout_h=p.get("zh"), zoneout_c=p.get("zc"),
        norm_ih=p.get("ln_ih"), norm_hh=p.get("ln_hh"), norm_cell=p.get("ln_c"),
        backend="reference",
    )


CASES = [
    ("dropout", dict(drop_p=0.4)),
    ("zoneout-train", dict(zone=0.3)),
    ("zoneout-eval", dict(zone=0.3, train_zone=False)),
    ("layer-norm", dict(layer_norm=True)),
    ("hard-sigmoid", dict(gate="hard_sigmoid", act="softsign")),
    ("all", dict(drop_p=0.25, zone=0.2, layer_norm=True, gate="hard_sigmoid", act="relu")),
]


# Layer norm is defined for the reset-after GRU only (test_layer_norm_refuses_reset_before).
GRIDS = [
    (mode, reset_after, name, options)
    for mode, reset_after in [("lstm", True), ("gru", True), ("gru", False)]
    for name, options in CASES
    if reset_after or not options.get("layer_norm")
]


@pytest.mark.parametrize("mode,reset_after,name,options", GRIDS,
                         ids=[f"{g[0]}-{g[1]}-{g[2]}" for g in GRIDS])
@pytest.mark.parametrize("reverse,with_lengths", [(False, False), (True, True), (False, True)])
def test_reference_equals_independent_loop(mode, reset_after, name, options, reverse,
                                           with_lengths):
    p, x, state = _setup(mode, seed=zlib.crc32(f"{mode}{name}".encode()) % 1000, **options)
    lengths = torch.tensor([5, 2, 4]) if with_lengths else None
    want_out, want_final = _loop(mode, p, x, state, reverse=reverse, lengths=lengths,
                                 reset_after=reset_after)
    got_out, got_final = dispatch.run(_call(mode, p, x, state, reverse=reverse,
                                            lengths=lengths, reset_after=reset_after))
    torch.testing.assert_close(got_out, want_out, atol=1e-12, rtol=0)
    for got, want in zip(got_final, want_final, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_layer_norm_refuses_reset_before():
    p, x, state = _setup("gru", seed=1, layer_norm=True)
    with pytest.raises(ValueError, match="reset_after=True"):
        dispatch.run(_call("gru", p, x, state, reset_after=False))


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_gradcheck_and_gradgradcheck_with_fixed_masks(mode):
    p, x, state = _setup(mode, seed=3, drop_p=0.3, zone=0.3, layer_norm=True, steps=3,
                         batch=2, features=3, hidden=3)
    names = ["w_ih", "w_hh", "b_ih", "b_hh"]
    leaves = [x, *state] + [p[n] for n in names] + [t for k in ("ln_ih", "ln_hh", "ln_c")
                                                    if k in p for t in p[k]]
    leaves = [t.clone().requires_grad_(True) for t in leaves]

    def run(*tensors):
        it = iter(tensors)
        xx = next(it)
        st = tuple(next(it) for _ in state)
        q = dict(p)
        for n in names:
            q[n] = next(it)
        for k in ("ln_ih", "ln_hh", "ln_c"):
            if k in p:
                q[k] = (next(it), next(it))
        out, final = dispatch.run(_call(mode, q, xx, st, lengths=torch.tensor([3, 2])))
        return (out, *final)

    assert torch.autograd.gradcheck(run, leaves)
    assert torch.autograd.gradgradcheck(run, leaves)
