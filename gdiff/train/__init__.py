"""Training: TrainState, optimiser, the shared loop, and the diffusion and classifier trainers.

`diffusion_trainer.train(config, workdir)` (--mode=train) and
`classifier_trainer.train(config, workdir)` (--mode=train_classifier).
"""
