"""Neural ODE image classifiers: configuration, data, models, training, evaluation."""
