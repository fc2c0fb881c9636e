"""Training objectives beyond supervised next-token loss: DPO (dpo.py) and GRPO (grpo.py).

Both run on vlmkit's Trainer through the adapter seam (`encode` for label masks, `generate` for
GRPO's samples), so every family gets them with no per-family code; options.py holds the config.
"""
