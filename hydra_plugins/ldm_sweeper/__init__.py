"""ldm's Hydra plugins (Hydra loads sweepers only from the `hydra_plugins` namespace):
`resumable_optuna.ResumableOptunaSweeper`, named in conf/hparams_search/optuna.yaml."""
