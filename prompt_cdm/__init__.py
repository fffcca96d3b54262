"""prompt_cdm: Compartmentalized Diffusion Models on a frozen Stable Diffusion backbone."""
__version__ = "0.1.0"
