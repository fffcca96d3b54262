"""prompt_cdm.data."""
