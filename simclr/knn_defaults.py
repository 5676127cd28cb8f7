"""The weighted-kNN settings of Wu et al. 2018 that every default reads (the trainer's monitor,
``knn-eval``, ``classify``, the service). Free of torch, so that the command line starts fast."""

KNN_K = 200
KNN_TEMPERATURE = 0.07
