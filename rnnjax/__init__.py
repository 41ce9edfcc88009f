"""rnnjax: recurrent networks on sequence-MNIST in JAX, functional and fast."""

__version__ = "0.1.0"
