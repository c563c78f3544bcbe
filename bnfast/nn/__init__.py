"""A small NumPy neural-network framework whose batch-norm layers run on bnfast's kernels.

Modules follow a PyTorch-like protocol that fits in one file (:mod:`bnfast.nn.module`):
``forward(x)`` caches what ``backward(grad)`` needs; ``backward`` returns the input gradient
and accumulates parameter gradients into ``Parameter.grad``.  Parameter names, shapes and
order are PyTorch's, so ``load_state_dict`` takes a PyTorch model's ``state_dict()``.
The same code runs on NumPy arrays and, after ``model.to("cuda")``, on CuPy arrays on a
GPU (the layers compute with the array module of their input).

>>> import numpy as np
>>> from bnfast import nn, optim
>>> rng = np.random.default_rng(0)
>>> net = nn.Sequential(nn.Linear(20, 32, rng=rng), nn.BatchNorm1d(32), nn.ReLU(),
...                     nn.Linear(32, 3, rng=rng))
>>> loss_fn, opt = nn.CrossEntropyLoss(), optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
>>> x, y = rng.standard_normal((64, 20), dtype=np.float32), rng.integers(0, 3, 64)
>>> for step in range(5):
...     opt.zero_grad()
...     loss = loss_fn(net(x), y)
...     _ = net.backward(loss_fn.backward())
...     opt.step()
>>> loss < 1.0
True
"""
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .layers import (AvgPool2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, Sigmoid,
                     Tanh)
from .loss import CrossEntropyLoss, MSELoss
from .module import (Identity, Module, ModuleList, Parameter, Sequential, StateDictError, load,
                     save)
from .residual import BasicBlock, Residual
from .utils import batchnorm_layers, compute_population_stats, fold_batchnorm

__all__ = [
    "AvgPool2d",
    "BasicBlock",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Conv2d",
    "CrossEntropyLoss",
    "Dropout",
    "Flatten",
    "Identity",
    "Linear",
    "MSELoss",
    "MaxPool2d",
    "Module",
    "ModuleList",
    "Parameter",
    "ReLU",
    "Residual",
    "Sequential",
    "Sigmoid",
    "StateDictError",
    "Tanh",
    "batchnorm_layers",
    "compute_population_stats",
    "fold_batchnorm",
    "load",
    "save",
]
