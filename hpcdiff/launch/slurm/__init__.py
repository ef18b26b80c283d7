"""Slurm: sbatch scripts that requeue themselves (``sbatch``), the job's environment (``env``), what the
controller says about a job (``query``), chains of dependent jobs (``pipeline``) and the submitit API."""
