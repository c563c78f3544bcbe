"""Reproductions of experiments from Ioffe & Szegedy (2015), "Batch Normalization:
Accelerating Deep Network Training by Reducing Internal Covariate Shift", on bnfast.nn.

- :mod:`bnfast.paper.mnist_fig1`: Figure 1 (MNIST, sigmoid MLP, with and without BN).
- :mod:`bnfast.paper.accelerate`: the "accelerating BN networks" table (Figure 3), on a
  small convolutional network on MNIST.

Command line: ``bnfast paper {mnist,accelerate} [options]`` (also
``python -m bnfast.paper ...``); see "Reproducing the paper" in the documentation.
"""
from .cli import main

__all__ = ["main"]
