"""Ray Train + DeepSpeed glue for MUSAR's three-stage curriculum (paper section 4.1)."""
