"""The tools around a trained model: setdiff-convert, setdiff-sample, setdiff-eval."""
