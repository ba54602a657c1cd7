"""Meta-classifiers: predict a net's hyper-parameters from its weights."""
