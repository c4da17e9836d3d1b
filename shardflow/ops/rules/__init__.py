"""Rule modules, one family of ops each; importing this package registers them all."""

from shardflow.ops.rules import attention, basic, linalg, nn, pad, pointwise, reduce, shape  # noqa: F401
