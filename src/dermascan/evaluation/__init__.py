"""What a trained model is worth: metrics with CIs, calibration, plots, the report, the model card, error analysis."""
