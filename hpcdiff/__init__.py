"""hpcdiff: diffusion and flow-matching models of brain MRI, trained and sampled on MPI ranks and Slurm."""

__version__ = "0.1.0"
__all__ = ["__version__"]
