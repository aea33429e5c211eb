"""Large models: compress a checkpoint block by block, never holding the whole model."""

from .stream import ShardedCheckpoint, checkpoint_table, compress_checkpoint

__all__ = ["ShardedCheckpoint", "checkpoint_table", "compress_checkpoint"]
