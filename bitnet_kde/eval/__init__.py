"""Evaluation: a trained student against its teacher (evaluate, metrics, report outputs) and the
teacher baseline (the teacher's own greedy answers, latency and tokens/s)."""
