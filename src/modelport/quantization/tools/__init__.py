"""`modelport quantize`: calibration, the AWQ / GPTQ / FP8 algorithms and checkpoint writers."""
