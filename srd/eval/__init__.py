"""Evaluation (`srd eval`): benchmarks by name (srd.eval.benchmarks), each model's answers
generated, scored and summarised, resumable per benchmark and seed (srd.eval.evaluate)."""
