"""Recipes: the jobs a user runs, each assembled from the layers below. `srd train` (one stage
of KD or SFT), `srd run` / `srd reflect` (SRD as calls to the one-stage training loop, or the
KD baseline), `srd run` as a whole experiment (baseline, evaluation, comparison, report), and
`srd prune` (a depth-pruned student, healed by KD)."""
