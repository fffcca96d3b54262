"""prompt_cdm.registry."""
