"""facebookresearch/DiT's Gaussian diffusion on the host, in numpy (float64 tables and arithmetic).

`schedule`: the linear beta schedule, its tables, respacing and `q_sample`; `losses`: DiT's
`training_losses` and their gradient with respect to the model output; `sampling`: DDPM and DDIM
loops and classifier-free guidance over any model function. Nothing here imports a backend: the model
is a function of numpy arrays, so the torch reference and the NNTile model see identical inputs.
"""
from dit_compiler.app.diffusion.losses import LossTerms, training_losses
from dit_compiler.app.diffusion.sampling import guided, sample_loop
from dit_compiler.app.diffusion.schedule import NUM_TIMESTEPS, Diffusion, create_diffusion, space_timesteps

__all__ = ["NUM_TIMESTEPS", "Diffusion", "LossTerms", "create_diffusion", "guided", "sample_loop",
           "space_timesteps", "training_losses"]
