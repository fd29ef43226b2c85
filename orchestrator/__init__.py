"""encmm orchestrator: the CLI, Ray cluster/Tune glue and the one module that speaks MLflow."""
