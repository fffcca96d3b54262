"""prompt_cdm.backbone."""
