"""prompt_cdm's evaluation package: TIFA, FID, backbone quality, benchmarks."""
