"""prompt_cdm.training."""
