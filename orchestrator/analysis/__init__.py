"""Analysis: MLflow -> Arrow tables, power-law fits, frontier, tables and plots."""
