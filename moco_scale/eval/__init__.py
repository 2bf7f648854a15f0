"""Evaluation of what was pretrained: linear evaluation, distributed kNN, fine-tuning recipes."""
