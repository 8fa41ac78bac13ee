"""tmpq's ground floor: what every layer stands on and which imports nothing above it (errors, file I/O, row logs,
timestep schedules, the sampler and noise bank, model loading, data, image grids). See ARCHITECTURE.md."""
