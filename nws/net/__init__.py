"""One net, from configuration to snapshots: the CNN family (`cnn`, `layers`), how it is
evaluated (`fidelity`), its input (`pipeline`, `augmentation`), its training (`optimizers`,
`training`, with the kept compiled models of `compiled` and the packs of `pack`), and its weights
as snapshots in the layout contract (`snapshots`) with their function-preserving
transformations (`symmetry`). Nothing here knows of MLflow or Optuna: the campaign drives it."""
