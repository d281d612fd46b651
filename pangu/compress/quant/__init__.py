"""Post-training quantisation of DiTs: calibration capture, contiguous timestep grouping, the HTG method
(timestep-aware shift and scale folded into the model), the baselines, and weight / activation quantisers."""
