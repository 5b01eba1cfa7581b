"""memstate on torch.distributed (torchrun, c10d; gloo on CPU, NCCL on GPU)."""
