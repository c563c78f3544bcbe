"""Residual blocks: a generic `Residual` wrapper and torchvision's `BasicBlock` layout."""
import numpy as np

from .batchnorm import BatchNorm2d
from .layers import Conv2d, ReLU
from .module import Module, Sequential, _as_rng

__all__ = ["Residual", "BasicBlock"]


class Residual(Module):
    """``activation(body(x) + shortcut(x))``.

    Parameters
    ----------
    body : Module
        The residual branch, applied to the input.
    shortcut : Module, optional
        Default the identity (the shapes of ``body(x)`` and `x` must then agree).
    activation : Module, optional
        Applied after the sum, e.g. ``ReLU()``.

    Raises
    ------
    TypeError
        If `body`, `shortcut` or `activation` is given and is not a `Module`.
    ValueError
        From ``forward``, if the outputs of the body and of the shortcut differ in shape.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> block = nn.Residual(nn.Sequential(nn.Linear(4, 4, rng=0), nn.BatchNorm1d(4)),
    ...                     activation=nn.ReLU())
    >>> block(np.ones((3, 4), np.float32)).shape
    (3, 4)
    """

    def __init__(self, body, shortcut=None, activation=None):
        super().__init__()
        for m, name in ((body, "body"), (shortcut, "shortcut"), (activation, "activation")):
            if m is not None and not isinstance(m, Module):
                raise TypeError(f"Residual: {name} must be a Module, got {m!r}")
        self.body = body
        self.shortcut = shortcut
        self.activation = activation

    def forward(self, x):
        y = self.body.forward(x)
        s = x if self.shortcut is None else self.shortcut.forward(x)
        if y.shape != s.shape:
            raise ValueError(
                f"Residual: body output {y.shape} and shortcut output {s.shape} differ; "
                f"give a shortcut module that maps the input to the body's output shape")
        y = y + s
        return y if self.activation is None else self.activation.forward(y)

    def backward(self, grad):
        if self.activation is not None:
            grad = self.activation.backward(grad)
        gx = self.body.backward(grad)
        gs = grad if self.shortcut is None else self.shortcut.backward(grad)
        return gx + gs


class BasicBlock(Module):
    """The ResNet basic block with torchvision's attribute names.

    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))`` with 3x3 convolutions without
    bias; `downsample` (1x1 convolution with `stride`, then batch norm) is added when the
    stride or the channel count changes.  State-dict keys (``conv1.weight``,
    ``bn1.running_mean``, ``downsample.0.weight``, ...) match
    ``torchvision.models.resnet.BasicBlock``.  The first ReLU is fused into ``bn1``.

    Parameters
    ----------
    in_channels, out_channels : int
        The number of input and output channels; when they differ, `downsample` projects the
        shortcut.
    stride : int, default 1
        Stride of ``conv1`` (and of the shortcut's 1x1 convolution); 2 halves the height and
        width.
    channels_last : bool, default False
        Take and return ``(N, H, W, C)`` arrays instead of ``(N, C, H, W)`` (passed to every
        convolution and batch-norm layer).
    dtype : float32 or float64, default float32
        Dtype of the parameters and buffers; inputs must have the same dtype.
    rng : None, int or numpy.random.Generator
        Source of the initial convolution weights: None for fresh entropy, an int seed, or a
        Generator.

    Raises
    ------
    ValueError
        If a channel count or `stride` is not a positive integer; from ``forward``, as for
        :class:`Conv2d` and :class:`BatchNorm2d` (e.g. the wrong number of channels).
    TypeError
        If `dtype` is not float32 or float64, or `rng` is not None, an int or a Generator.

    Examples
    --------
    >>> import numpy as np
    >>> from bnfast import nn
    >>> block = nn.BasicBlock(4, 8, stride=2, rng=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 4, 8, 8), dtype=np.float32)
    >>> y = block(x)
    >>> y.shape
    (2, 8, 4, 4)
    >>> block.backward(np.ones_like(y)).shape
    (2, 4, 8, 8)
    >>> [k for k in block.state_dict() if k.startswith("downsample")]
    ['downsample.0.weight', 'downsample.1.weight', 'downsample.1.bias',
     'downsample.1.running_mean', 'downsample.1.running_var',
     'downsample.1.num_batches_tracked']
    >>> nn.BasicBlock(8, 8, rng=0).downsample is None      # same shape: identity shortcut
    True
    """

    def __init__(self, in_channels, out_channels, stride=1, *, channels_last=False,
                 dtype=np.float32, rng=None):
        super().__init__()
        rng = _as_rng(rng)
        kw = dict(channels_last=channels_last, dtype=dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride, 1, bias=False, rng=rng, **kw)
        self.bn1 = BatchNorm2d(out_channels, relu=True, **kw)
        self.conv2 = Conv2d(out_channels, out_channels, 3, 1, 1, bias=False, rng=rng, **kw)
        self.bn2 = BatchNorm2d(out_channels, **kw)
        if stride != 1 or in_channels != out_channels:
            self.downsample = Sequential(
                Conv2d(in_channels, out_channels, 1, stride, bias=False, rng=rng, **kw),
                BatchNorm2d(out_channels, **kw))
        else:
            self.downsample = None
        self.relu = ReLU()

    # pairs (linear-layer attribute, batch-norm attribute) that fold_batchnorm may merge
    _fold_pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def forward(self, x):
        y = self.bn1.forward(self.conv1.forward(x))
        y = self.bn2.forward(self.conv2.forward(y))
        s = x if self.downsample is None else self.downsample.forward(x)
        return self.relu.forward(y + s)

    def backward(self, grad):
        g = self.relu.backward(grad)
        gx = self.conv1.backward(self.bn1.backward(self.conv2.backward(self.bn2.backward(g))))
        gs = g if self.downsample is None else self.downsample.backward(g)
        return gx + gs

