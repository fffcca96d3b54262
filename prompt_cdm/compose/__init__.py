"""prompt_cdm.compose."""
