"""Reports about this machine and its models, built on the loader: doctor, bench, info (inspect) and the GPU
offload plan. The floor above runtime/device (the probe: hardware, memory), which they read."""
