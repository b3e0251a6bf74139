"""Layer-normalized LSTM and GRU layers (Ba et al. 2016; haste's LayerNormLSTM/LayerNormGRU)
and zoneout on layers, against loops built here from torch.nn.LayerNorm and the equations
(no rnnkit step function), plus torch.nn state_dict loading and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnnkit


def _norm(size, gain, bias):
    norm = nn.LayerNorm(size, eps=1e-5, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(gain)
        norm.bias.copy_(bias)
    return norm


def _perturb_norms(layer, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.startswith("layer_norm_"):
                param.add_(torch.randn(param.shape, generator=generator,
                                       dtype=param.dtype) * 0.3)


def _loop(layer, x, zoneout_masks=None):
    """Run `layer` (one direction per layer, any depth) step by step from the equations."""
    mode = type(layer).__name__
    hidden = layer.hidden_size
    p = layer.spec.zoneout
    steps, batch = x.shape[0], x.shape[1]
    layer_input = x
    for k in range(layer.num_layers):
        def get(name, k=k):
            return getattr(layer, f"{name}_l{k}")

        ln_x = _norm(get("weight_ih").shape[0], get("layer_norm_ih_weight"),
                     get("layer_norm_ih_bias"))
        ln_h = _norm(get("weight_hh").shape[0], get("layer_norm_hh_weight"),
                     get("layer_norm_hh_bias"))
        ln_c = (_norm(hidden, get("layer_norm_cell_weight"), get("layer_norm_cell_bias"))
                if mode == "LSTM" else None)
        h = torch.zeros(batch, hidden, dtype=x.dtype)
        c = torch.zeros(batch, hidden, dtype=x.dtype)
        outputs = []
        for t in range(steps):
            a_x = ln_x(layer_input[t] @ get("weight_ih").T) + get("bias_ih")
            a_h = ln_h(h @ get("weight_hh").T) + get("bias_hh")
            if mode == "LSTM":
                i, f, g, o = (a_x + a_h).split(hidden, dim=-1)
                c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h_new = torch.sigmoid(o) * torch.tanh(ln_c(c_new))
            else:  # haste's LayerNormGRU, in torch's gate order r, z, n
                x_r, x_z, x_n = a_x.split(hidden, dim=-1)
                h_r, h_z, h_n = a_h.split(hidden, dim=-1)
                r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
                n = torch.tanh(x_n + r * h_n)
                h_new, c_new = (1 - z) * n + z * h, c
            if p:
                if zoneout_masks is None:  # evaluation: the expectation
                    m_h = m_c = p
                else:
                    m_h = zoneout_masks[f"zoneout_h_l{k}"][t]
                    m_c = zoneout_masks.get(f"zoneout_c_l{k}", zoneout_masks[f"zoneout_h_l{k}"])[t]
                h_new = m_h * h + (1 - m_h) * h_new
                c_new = m_c * c + (1 - m_c) * c_new
            h, c = h_new, c_new
            outputs.append(h)
        layer_input = torch.stack(outputs)
    return layer_input


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("zoneout", [0.0, 0.3])
def test_layer_norm_layer_equals_a_loop_of_torch_layer_norms(kind, zoneout):
    torch.manual_seed(0)
    layer = getattr(rnnkit, kind)(3, 5, num_layers=2, layer_norm=True, zoneout=zoneout,
                                  dtype=torch.float64).eval()
    _perturb_norms(layer, 1)
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], _loop(layer, x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_zoneout_training_with_fixed_masks_equals_the_loop(kind):
    torch.manual_seed(2)
    layer_norm = kind != "RNN"
    options = {"layer_norm": True} if layer_norm else {"nonlinearity": "tanh"}
    layer = getattr(rnnkit, kind)(3, 5, num_layers=2, zoneout=0.4, dtype=torch.float64,
                                  **options).train()
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    masks = {}
    for k in range(2):
        masks[f"zoneout_h_l{k}"] = (torch.rand(6, 4, 5) < 0.4).double()
        if kind == "LSTM":
            masks[f"zoneout_c_l{k}"] = (torch.rand(6, 4, 5) < 0.4).double()
    got, _ = layer(x, dropout_masks=masks)
    if kind == "RNN":  # the loop for RNN is short enough to write here
        want, layer_input = None, x
        for k in range(2):
            h, outputs = torch.zeros(4, 5, dtype=torch.float64), []
            for t in range(6):
                new = torch.tanh(layer_input[t] @ getattr(layer, f"weight_ih_l{k}").T
                                 + getattr(layer, f"bias_ih_l{k}")
                                 + h @ getattr(layer, f"weight_hh_l{k}").T
                                 + getattr(layer, f"bias_hh_l{k}"))
                m = masks[f"zoneout_h_l{k}"][t]
                h = m * h + (1 - m) * new
                outputs.append(h)
            layer_input = torch.stack(outputs)
        want = layer_input
    else:
        want = _loop(layer, x, masks)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_torch_state_dict_loads_with_strict_false(kind):
    theirs = getattr(nn, kind)(3, 5, num_layers=2, bidirectional=True)
    ours = getattr(rnnkit, kind)(3, 5, num_layers=2, bidirectional=True, layer_norm=True)
    _perturb_norms(ours, 3)
    ours.reset_parameters()  # back to gains 1, biases 0
    result = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert result.unexpected_keys == []
    parts = ["ih", "hh"] + (["cell"] if kind == "LSTM" else [])
    expected = {f"layer_norm_{part}_{what}_l{k}{suffix}" for part in parts
                for what in ("weight", "bias") for k in range(2) for suffix in ("", "_reverse")}
    assert set(result.missing_keys) == expected
    for name, param in theirs.named_parameters():
        assert torch.equal(getattr(ours, name), param), name
    for name in expected:
        value = getattr(ours, name)
        assert torch.equal(value, torch.ones_like(value) if "_weight" in name
                           else torch.zeros_like(value)), name
    with pytest.raises(RuntimeError, match="Missing key"):
        ours.load_state_dict(theirs.state_dict())


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_layer_gradcheck_with_every_option_and_fixed_masks(kind):
    torch.manual_seed(4)
    layer = getattr(rnnkit, kind)(2, 3, layer_norm=True, zoneout=0.3, recurrent_dropout=0.3,
                                  input_dropout=0.2, bidirectional=True,
                                  recurrent_activation="hard_sigmoid",
                                  dtype=torch.float64).train()
    _perturb_norms(layer, 5)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    masks = layer.sequence_masks(2)
    for suffix in ("", "_reverse"):
        masks["zoneout_h_l0" + suffix] = (torch.rand(3, 2, 3) < 0.3).double()
        if kind == "LSTM":
            masks["zoneout_c_l0" + suffix] = (torch.rand(3, 2, 3) < 0.3).double()
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]

    def run(x, *values):
        out, _ = torch.func.functional_call(layer, dict(zip(names, values)), (x,),
                                            {"dropout_masks": masks, "lengths": [3, 2]})
        return out

    assert torch.autograd.gradcheck(run, (x, *params))
    # Second order: with respect to the input and the recurrent weights (time is short).
    recurrent = [i for i, n in enumerate(names) if n.startswith("weight_hh")]

    def run_second(x, *chosen):
        values = list(params)
        for i, value in zip(recurrent, chosen):
            values[i] = value
        return run(x, *values)

    assert torch.autograd.gradgradcheck(run_second, (x, *[params[i] for i in recurrent]))
