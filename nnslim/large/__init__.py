"""Large models: compress a checkpoint block by block, never holding the whole model."""

from .stream import ShardedCheckpoint, compress_checkpoint

__all__ = ["ShardedCheckpoint", "compress_checkpoint"]
