"""What a run reports about itself: parameter counts and FLOPs (`flops`), the MFU denominator (`peak`), metrics
sinks (`writers`), the progress bar (`progress`), experiment tracking (`tracking`), run_info.json
(`run_info`); `metrics` re-exports them.
"""
