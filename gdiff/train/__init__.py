"""Training: TrainState, optimiser, the update rule, the shared loop, and the two trainers.

`diffusion_trainer.train(config, workdir)` (--mode=train) and
`classifier_trainer.train(config, workdir)` (--mode=train_classifier) describe a `task.Task`;
`runner` runs it (init or resume, jitted step, checkpoints, preemption), `update` is the
optimiser + EMA + non-finite-skip step, `loop_utils` the logging.
"""
