"""gRPC servicers: validate, call the kernel, map errors. Nothing else."""
