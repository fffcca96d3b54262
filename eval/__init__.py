"""prompt_cdm's evaluation package: TIFA (tifa, vqa), FID/KID/CLIPScore (fid), memorization, backbone quality,
benchmarks."""
