"""DiT diffusion transformer (seed 000): adaLN-Zero blocks, DDPM training, DDIM sampling, images and 1-D token sequences."""
