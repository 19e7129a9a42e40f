"""diffscale's experiment side: configs, trials, sweeps, tracking and analysis."""
