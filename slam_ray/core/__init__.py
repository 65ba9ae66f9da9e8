"""The stage contract, which imports no stage: running a stage (runner), its output folder and key (stage_io),
the build lock, object storage, MLflow tracking, input fingerprints."""
