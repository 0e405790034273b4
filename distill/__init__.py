"""distill: knowledge distillation of LLMs with Ray teacher services and DeepSpeed ZeRO students."""
