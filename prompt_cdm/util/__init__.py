"""prompt_cdm.util."""
