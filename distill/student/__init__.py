"""Student engine: DeepSpeed ZeRO training, atomic checkpoints, export."""
