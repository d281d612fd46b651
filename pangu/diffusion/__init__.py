"""Diffusion: noise schedules, the DDPM objective, DDPM / DDIM samplers with classifier-free guidance, the
embedded digits data, and the FID-digits metric (a small classifier's penultimate features)."""
