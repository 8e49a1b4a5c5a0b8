"""Captioned image sets: recall@k as CLIP_benchmark defines it, and fine-tuning."""
