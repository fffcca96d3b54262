"""prompt_cdm.hub."""
