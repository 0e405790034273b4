"""Evaluating distilled students against their teacher (`python -m launch.evaluate`, or a training run's
end with report.enabled).

`report`: the checks and the measurements, model by model; `document`: report.md, metrics.json, the plots
and W&B. Beneath them, `metrics`: how closely a student's next-token distributions match the teacher's on
held-out rows, and each model's perplexity and calibration; `similarity`: both models generate from the
same prompts and the student's outputs are scored against the teacher's (exact match, token agreement,
BLEU, ROUGE-L, an optional judge model); `speed`: what a model costs to keep and run (parameters, bytes on
disk, peak memory, prefill and decode speed, time to first token).
"""
