"""Training, evaluation and job orchestration for ISTR (see docs/design.md, "Engine").

- ``job``: ``train_and_evaluate(cfg, output_dir)``, ``fit_pca_job(cfg, output_dir)``
- ``train``: the resumable, DDP-aware training loop; ``evaluate``: COCOeval per stage
- ``checkpoint``: atomic files; ``schedule``: AdamW + warm-up/step lr; ``sampling``: deterministic data order
- ``distributed``: process groups from torchrun/SLURM; ``profiling``: per-iteration time breakdown
"""
