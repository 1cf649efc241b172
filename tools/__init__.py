"""Small tools shared by the deployment launcher, the sweeps and the benchmarks."""
