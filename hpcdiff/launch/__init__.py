"""Launchers, one package per target: ``local`` (mpirun and the restarting supervisor), ``slurm`` (sbatch
rendering, submission, job chains, the submitit API) and ``aws`` (ParallelCluster and PCS configs, S3 staging)."""
