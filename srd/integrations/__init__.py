"""SRD inside other trainers: `hf` (Hugging Face datasets and any Trainer), `trl` (TRL's GKDTrainer)."""
