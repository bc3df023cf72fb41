"""dpo-lightning: Direct Preference Optimization as a PyTorch Lightning module.

The package is layered; a module imports only from its own layer and those below it:

    foundation   errors, hub, builtin, layout, integrity, console, lightning_compat, memory, losses,
                 pair_losses
                 (top-level modules; they import no layer, only one another)
    config/      the typed configuration and its one parser
    data/        sources -> formats -> tokenize -> collate -> DataModule; the typed batches; the mode decision
    models/      loading causal LMs, tokenizers and the RewardModel network
    dpo/         log-probs, the reference seam, the pair objective and its metrics
    online/      samplers, judges, pairing of samples, generation comparison
    evaluation/  evaluate.py's run, pair metrics, report and plots (beside training: neither imports the other)
    training/    Lightning modules, the run, checkpoints, strategies, report sinks
    determined/  the bridge to Determined's Core API (the only importer of `determined`)

Each folder's `__init__.py` says what lives there and, on its `Imports:` line, what it may import;
tests/test_structure.py holds the code to it.
"""

__version__ = "0.1.0"
