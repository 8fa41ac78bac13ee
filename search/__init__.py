"""The search service: timestep groups, genome, engines, executors, run directory. Filled in by the search issue."""
