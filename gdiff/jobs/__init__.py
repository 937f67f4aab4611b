"""The jobs: one module per mode of the command line (`gdiff/cli.py`), the top of the module graph.

Each job takes the whole config and the workdir, `run(config, workdir, *, mesh=None, ...)`, and
hands what is its own to the layers below: the run engine (gdiff/engine/) for sharded, resumable
work, the compat adapter (gdiff/compat/) for the reference's formats, and the library (models,
diffusion, sampling, evaluation, data, train, checkpoints) for everything else. Nothing below
imports a job.

    sample.py    --mode=sample     sampling runs (per guidance scale)
    sweep.py     --mode=sweep      classifier-scale ablations over several models
    nll.py       --mode=nll        bits/dim (the reference's image_nll.py)
    train.py     --mode=train / train_classifier
    convert.py   --mode=convert    a released PyTorch checkpoint -> an orbax one
    digits.py    --mode=pipeline   the embedded default job (the paper's Table 4 on digits)
"""
