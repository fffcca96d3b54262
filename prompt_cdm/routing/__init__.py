"""prompt_cdm.routing."""
