"""AWS: a cluster that looks like an academic one (ParallelCluster ``cluster`` config, or ``pcs``), its
bootstrap script, the offline config check (``pcluster_check``) and S3 staging (``s3stage``)."""
