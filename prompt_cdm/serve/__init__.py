"""prompt_cdm.serve."""
