"""prompt_cdm.core."""
