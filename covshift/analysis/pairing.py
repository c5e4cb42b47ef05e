"""Which layer of the bn run plays the same role as which layer of the nobn run.

Layers are matched by module type and forward order, never by name (a
``build_model(batchnorm)`` pair shifts ``nn.Sequential`` indices). From ``trace.layer_info()``
(one row per run and layer, in forward order):

- ``weighted``: the k-th Linear/Conv of one run with the k-th of the other;
- ``nonlinearity``: the k-th nonlinearity (a layer with a ``nonlinearity`` kind, or an
  activation class in :data:`ACTIVATIONS`) with the k-th;
- ``input``: the input of nonlinearity k, taken as the layer recorded just before it in
  forward order: the BatchNorm output in bn, the Linear/Conv output (or the Identity that
  replaced BatchNorm) in nobn. This is an approximation where something unrecorded sits
  between them, e.g. a residual addition.

When the runs have different counts of a kind, the first ones are paired up to the shorter.

>>> info = pd.DataFrame({"run": ["b"] * 4 + ["n"] * 3, "layer": ["0", "0_bn", "1", "2", "0", "1", "2"],
...     "type": ["Linear", "BatchNorm1d", "Tanh", "Linear", "Linear", "Tanh", "Linear"],
...     "nonlinearity": [None, None, "tanh", None, None, "tanh", None]})
>>> pairs(info, "b", "n")[["role", "bn", "nobn"]].values.tolist()
[['Linear/Conv 1', '0', '0'], ['Linear/Conv 2', '2', '2'], ['nonlinearity 1 (Tanh)', '1', '1'], \
['input to nonlinearity 1', '0_bn', '0']]
>>> layers(info, "b", "weighted")
['0', '2']
"""

from __future__ import annotations

import pandas as pd

# Conv1D: Hugging Face's Linear with a transposed weight (GPT-2's c_attn, c_proj, c_fc)
WEIGHTED = {"Linear", "LazyLinear", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d",
            "ConvTranspose2d", "ConvTranspose3d", "Conv1D"}
ACTIVATIONS = {"ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Sigmoid",
               "Tanh", "Softsign", "Softplus", "Hardtanh", "Hardsigmoid", "Hardswish", "Tanhshrink", "LogSigmoid"}
COLUMNS = ["role", "kind", "index", "bn", "nobn"]


def _roles(info: pd.DataFrame, run: str) -> dict[str, list[tuple[str, str]]]:
    """Per kind, the run's (layer, type) in forward order."""
    rows = info[info["run"] == run]
    layers, types = rows["layer"].astype(str).tolist(), rows["type"].astype(str).tolist()
    nonlinear = [t in ACTIVATIONS or isinstance(k, str) for t, k in zip(types, rows["nonlinearity"])]
    out: dict[str, list[tuple[str, str]]] = {"weighted": [], "nonlinearity": [], "input": []}
    for i, (layer, kind) in enumerate(zip(layers, types)):
        if kind in WEIGHTED:
            out["weighted"].append((layer, kind))
        if nonlinear[i]:
            out["nonlinearity"].append((layer, kind))
            if i > 0:
                out["input"].append((layers[i - 1], types[i - 1]))
    return out


def layers(info: pd.DataFrame, run: str, kind: str) -> list[str]:
    """One run's layers of a role ``kind`` ('weighted' | 'nonlinearity' | 'input'), in forward order.

    >>> info = pd.DataFrame({"run": ["r"] * 4, "layer": ["0", "1", "2", "3"],
    ...     "type": ["Linear", "ReLU", "Linear", "Softmax"], "nonlinearity": [None, "relu", None, None]})
    >>> layers(info, "r", "input"), layers(info, "r", "weighted")
    (['0'], ['0', '2'])
    """
    return [layer for layer, _ in _roles(info, run)[kind]]


def pairs(info: pd.DataFrame, bn: str, nobn: str) -> pd.DataFrame:
    """The role table ``role, kind, index, bn, nobn`` of two runs (see the module docstring)."""
    a, b = _roles(info, bn), _roles(info, nobn)
    rows = []
    for kind in ("weighted", "nonlinearity", "input"):
        for k, ((la, ta), (lb, _)) in enumerate(zip(a[kind], b[kind]), start=1):
            role = {"weighted": f"Linear/Conv {k}", "nonlinearity": f"nonlinearity {k} ({ta})",
                    "input": f"input to nonlinearity {k}"}[kind]
            rows.append((role, kind, k, la, lb))
    return pd.DataFrame(rows, columns=COLUMNS)
